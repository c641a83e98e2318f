"""Reading WAV pairs: validation of every file, the dataset, the latent cache, and a run's (distributed) data:
both splits checked once, their beat grids, caches and loaders (`TrainingData`)."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from beats import (
    Grid,
    Pulse,
    align,
    bar_anchor,
    estimate_key,
    lay_on_grid,
    level_db,
    loudness_lufs,
    padded_beats,
    track_beats,
)
from config import SILENCE_DB
from distributed import cpus_per_rank
from listening import layer_guide
from run_log import atomic_write, replaced

BEATS_FILE = "beats.json"  # in each split folder: pair name -> its grid (see pair_grid)
FILL_BATCH = 8  # pairs encoded at once into a latent cache
RHYTHM_SUFFIX = "_rhythm"  # pair_0007_input_rhythm.wav: the rhythm layer of pair_0007_input.wav (separator's stems)


def rhythm_path(path: str) -> str:
    """The rhythm layer's file of a pair's input or output file."""
    return path[: -len(".wav")] + RHYTHM_SUFFIX + ".wav"


def silence_problem(audio: np.ndarray, silence_db: float = SILENCE_DB) -> str | None:
    """'silent (...)' when the RMS level of `audio` is below `silence_db`, else None: the one definition of
    silence for make_pairs.py, the pairs check, arrange.py and evaluate.py."""
    level = level_db(audio)
    return f"silent (RMS {level:.1f} dBFS, below {silence_db:g} dBFS)" if level < silence_db else None


def path_problem(path: str, expect: str = "file") -> str | None:
    """What is wrong with `path` where a `expect` ('file' or 'folder') is expected, or None: missing, the other
    kind, or no permission to read it."""
    if not os.path.exists(path):
        return "does not exist"
    if expect == "file" and os.path.isdir(path):
        return "is a folder, but a file is expected here"
    if expect == "folder" and not os.path.isdir(path):
        return "is a file, but a folder is expected here"
    if not os.access(path, os.R_OK | (os.X_OK if expect == "folder" else 0)):
        return "no permission to read it"
    return None


class BadDataError(ValueError):
    """Some files of a pairs folder are unusable; `problems` lists (path, reason) for every one of them."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = "\n".join(f"  {path}: {reason}" for path, reason in problems)
        super().__init__(f"{len(problems)} bad file(s) in the pairs folder:\n{lines}")


def check_file(path: str, sample_rate: int, min_samples: int, silence_db: float = SILENCE_DB) -> str | None:
    """Why `path` is unusable (unreadable, wrong rate, too short, non-finite, silent), or None if it is fine."""
    if problem := path_problem(path):
        return problem
    try:
        info = sf.info(path)
    except Exception as err:  # soundfile raises several types for non-audio files
        return f"unreadable or not audio ({str(err).splitlines()[0][:120]})"
    if info.samplerate != sample_rate:
        return f"wrong sample rate {info.samplerate} Hz (expected {sample_rate})"
    if info.frames < min_samples:
        return f"too short: {info.frames} samples (expected at least {min_samples})"
    try:
        audio, _ = sf.read(path, frames=min_samples, dtype="float32", always_2d=True)
    except Exception as err:
        return f"unreadable or truncated ({str(err).splitlines()[0][:120]})"
    if len(audio) < min_samples:
        return f"truncated: {len(audio)} samples readable (expected {min_samples})"
    if not np.isfinite(audio).all():
        return "non-finite samples (NaN or Inf)"
    return silence_problem(audio, silence_db)


def list_pairs(folder: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """((input, output) paths of complete pairs, (path, reason) of files without a partner), sorted."""
    inputs = sorted(glob.glob(os.path.join(folder, "pair_*_input.wav")))
    outputs = set(glob.glob(os.path.join(folder, "pair_*_output.wav")))
    pairs, problems = [], []
    for path in inputs:
        partner = path[: -len("_input.wav")] + "_output.wav"
        if partner in outputs:
            pairs.append((path, partner))
            outputs.discard(partner)
        else:
            problems.append((path, f"missing partner {os.path.basename(partner)}"))
    problems += [(path, "missing partner " + os.path.basename(path).replace("_output", "_input"))
                 for path in sorted(outputs)]
    return pairs, problems


def scan_pairs(folder: str, sample_rate: int, segment_samples: int, progress: bool = False,
               silence_db: float = SILENCE_DB):
    """(good (input, output) pairs, (path, reason) of every bad file) of one split folder."""
    pairs, problems = list_pairs(folder)
    good = []
    for inp, out in tqdm(pairs, desc=f"checking {folder}", unit="pair", disable=not progress, leave=False):
        reasons = [(p, r) for p in (inp, out) if (r := check_file(p, sample_rate, segment_samples, silence_db))]
        problems += reasons
        if not reasons:
            good.append((inp, out))
    return good, problems


def pair_name(input_path: str) -> str:
    """pair_0007 for .../pair_0007_input.wav."""
    return os.path.basename(input_path)[: -len("_input.wav")]


def pair_grid(pulse: Pulse, start: float, middle: float, end: float, key: tuple[int, bool]) -> dict:
    """A pair's entry in beats.json: the beat times (s) of its input (start..middle) and output (middle..end)
    segments, each from its own start; their bar lines likewise, from a bar before to a bar after, so a segment
    shorter than a bar still knows where its bars fall; the meter, tempo (BPM, 0 without a pulse) and key of its
    song."""
    bar = 60.0 / pulse.tempo * max(1, pulse.meter) if pulse.tempo else 0.0

    def inside(times: np.ndarray, a: float, b: float, margin: float = 0.0) -> list[float]:
        return [round(float(t) - a, 4) for t in times if a - margin <= t < b + margin]

    return dict(input=inside(pulse.beats, start, middle), output=inside(pulse.beats, middle, end),
                input_bars=inside(pulse.downbeats, start, middle, bar), output_bars=inside(pulse.downbeats, middle,
                                                                                             end, bar),
                meter=int(pulse.meter), tempo=round(float(pulse.tempo), 3), key=int(key[0]), minor=bool(key[1]))


def load_beat_grids(folder: str, pairs: list[tuple[str, str]], sample_rate: int, progress: bool = False) -> dict:
    """Pair name -> its grid (pair_grid), from FOLDER/beats.json, which make_pairs.py writes after tracking the
    beats and bars of every whole song. Pairs it lacks, or whose bars it lacks (folders made before it, or before
    bars), are analysed once, on their two segments joined, and the file is completed and kept. Empty beats: no
    usable pulse (sections are fixed blocks)."""
    path = os.path.join(folder, BEATS_FILE)
    grids = {}
    if os.path.isfile(path):
        with open(path) as f:
            grids = json.load(f)
    missing = [pair for pair in pairs if "input_bars" not in grids.get(pair_name(pair[0]), {})]
    for inp, out in tqdm(missing, desc=f"beat grids of {folder}", unit="pair", disable=not progress, leave=False):
        audio = np.concatenate([sf.read(p, dtype="float32", always_2d=True)[0].mean(axis=1) for p in (inp, out)])
        seconds = len(audio) / sample_rate
        key, minor, _ = estimate_key(audio, sample_rate)
        grids[pair_name(inp)] = pair_grid(track_beats(audio, sample_rate), 0.0, seconds / 2, seconds, (key, minor))
    if missing:
        try:
            atomic_write(path, lambda f: f.write(json.dumps(grids).encode()))
        except OSError:  # a read-only folder: the grids serve this run from memory
            pass
    return grids


def infer_segment_samples(folder: str, probe: int = 25) -> int:
    """The pairs' segment length: the most common length among the first readable files of `folder`."""
    pairs, _ = list_pairs(folder)
    if not pairs:
        raise FileNotFoundError(f"no pair_XXXX_input.wav / pair_XXXX_output.wav files in {folder}")
    lengths = []
    for path in (p for pair in pairs[:probe] for p in pair):
        try:
            lengths.append(sf.info(path).frames)
        except Exception:  # reported by the dataset's check with its reason
            continue
    if not lengths:
        raise BadDataError([(folder, "none of the first files is readable audio")])
    return max(set(lengths), key=lengths.count)


@dataclass(frozen=True)
class Reading:
    """How a WavPairsDataset reads its folder (the class says what each option does)."""
    shuffle_targets: bool = False
    align_targets: bool = False
    seed: int = 0
    skip_bad_files: bool = False
    silence_db: float = SILENCE_DB
    stems: bool = False
    guide: bool = False


class WavPairsDataset(Dataset):
    """{input [1, S], target [1, S], beats [K]} from the pairs of one split folder: float32 waveforms and the beats
    (s) of the input segment padded with NaN to a fixed size (see load_beat_grids); with `stems`, in a folder whose
    pairs carry their rhythm layers (make_pairs.py --stems), also `rhythm` [2, 1, S]: the input's and the target's;
    with `guide`, also `guide` [frames]: the layering agent's guide (listening.layer_guide), kept for a pair whose
    target is its own (it is not cheap on a CPU: the median filters).

    Every file is checked when the dataset is built (or `scan`, the result of `scan_pairs` made elsewhere, is
    used); bad files raise BadDataError listing all of them, or are dropped (with their pair) when
    `skip_bad_files`. `shuffle_targets` pairs each input with another pair's target, drawn afresh each epoch
    (`set_epoch`) but reproducibly from `seed`; `align_targets` lays that target on the input's grid first (tempo,
    beats, key, loudness: beats.align, as arrange.py does with two songs).
    """

    def __init__(self, folder: str, sample_rate: int, segment_samples: int, reading: Reading | None = None,
                 scan=None, progress: bool = False, **options):
        """`reading` (Reading), or its fields as keywords (`options`)."""
        if problem := path_problem(folder, "folder"):
            raise FileNotFoundError(f"pairs folder {folder}: {problem}")
        r = reading or Reading(**options)
        self.folder, self.sample_rate, self.segment_samples = folder, sample_rate, segment_samples
        self.shuffle_targets, self.seed, self.epoch = r.shuffle_targets, r.seed, 0
        self.align_targets, self.guide, self.guides = r.align_targets, r.guide, {}
        good, problems = scan if scan is not None else scan_pairs(folder, sample_rate, segment_samples, progress,
                                                                  r.silence_db)
        self.problems = problems
        if problems and not r.skip_bad_files:
            raise BadDataError(problems)
        self.pairs = good
        with_stems = [all(os.path.isfile(rhythm_path(p)) for p in pair) for pair in good] if r.stems else []
        if any(with_stems) and not all(with_stems):
            raise BadDataError([(rhythm_path(pair[0]), "missing: some pairs of this folder carry their rhythm "
                                 "stems, and this one does not")
                                for pair, has in zip(good, with_stems, strict=True) if not has])
        self.stems = any(with_stems)  # False: the layers come from harmonic-percussive separation
        grids = load_beat_grids(folder, good, sample_rate, progress)
        self.grids = [grids[pair_name(inp)] for inp, _ in good]
        seconds = segment_samples / sample_rate
        self.beats = [padded_beats(g["input"], seconds) for g in self.grids]
        self.bars = [bar_anchor(g["input_bars"], g["meter"]) for g in self.grids]

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def read(self, path: str) -> torch.Tensor:
        audio, _ = sf.read(path, frames=self.segment_samples, dtype="float32", always_2d=True)
        return torch.from_numpy(audio.mean(axis=1))[None, :]

    def target_index(self, index: int) -> int:
        if not self.shuffle_targets or len(self.pairs) < 2:
            return index
        rng = np.random.default_rng((self.seed, self.epoch, index))
        other = int(rng.integers(0, len(self.pairs) - 1))
        return other + (other >= index)  # any pair but this one

    def grid(self, index: int, role: str, audio: torch.Tensor) -> Grid:
        """The grid of pair `index`'s input or output segment: its beats and bars, its song's tempo, meter and key,
        its loudness."""
        g = self.grids[index]
        return Grid(g["tempo"] if len(g[role]) >= 2 else 0.0, np.asarray(g[role]), g["key"], g["minor"],
                    loudness_lufs(audio[0].numpy(), self.sample_rate), downbeats=np.asarray(g[f"{role}_bars"]),
                    meter=g["meter"])

    def pair_guide(self, index: int, other: int, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """The layering agent's guide of one pair (listening.layer_guide), computed once for a pair whose target
        is its own."""
        if other == index and index in self.guides:
            return self.guides[index]
        guide = layer_guide(inp[None], tgt[None], self.sample_rate)[0]
        if other == index:
            self.guides[index] = guide
        return guide

    def __getitem__(self, index: int) -> dict:
        other = self.target_index(index)
        inp, tgt = self.read(self.pairs[index][0]), self.read(self.pairs[other][1])
        rhythm = [self.read(rhythm_path(p)) for p in (self.pairs[index][0], self.pairs[other][1])] if self.stems else []
        if self.align_targets and other != index:
            grids = self.grid(other, "output", tgt), self.grid(index, "input", inp)
            aligned, alignment = align(tgt[0].numpy(), inp[0].numpy(), self.sample_rate, grids, tolerant=True)
            tgt = torch.from_numpy(aligned)[None]
            if rhythm:  # the target's rhythm laid as the target was
                rhythm[1] = torch.from_numpy(lay_on_grid(rhythm[1][0].numpy(), alignment, inp.shape[-1],
                                                         self.sample_rate))[None]
        item = dict(input=inp, target=tgt, beats=self.beats[index], bars=self.bars[index])
        if self.guide:
            item["guide"] = self.pair_guide(index, other, inp, tgt)
        return {**item, "rhythm": torch.stack(rhythm)} if rhythm else item


@dataclass(frozen=True)
class Loading:
    """How a run's loaders read: `batch_size` pairs per rank and step, the samplers' `seed`, `workers` processes
    per loader, `pin_memory` for a GPU."""
    batch_size: int
    seed: int = 0
    workers: int = 0
    pin_memory: bool = False


def build_loader(dataset: Dataset, loading: Loading, shuffle: bool, share: tuple[int, int] = (0, 1),
                 drop_last: bool = False):
    """A DataLoader over this rank's share (DistributedSampler; `share`: (rank, world size)) with workers;
    returns (loader, sampler)."""
    rank, world_size = share
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=loading.seed)
    loader = DataLoader(dataset, batch_size=loading.batch_size, sampler=sampler, num_workers=loading.workers,
                        pin_memory=loading.pin_memory, persistent_workers=loading.workers > 0, drop_last=drop_last)
    return loader, sampler


def cache_key(dataset: WavPairsDataset, codec_settings: dict) -> str:
    """A hash of the codec's settings, the segment length and every file's name, size and modification time."""
    import hashlib
    import json

    files = []
    for pair in dataset.pairs:
        for path in pair:
            st = os.stat(path)
            files.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
    blob = json.dumps(dict(codec=codec_settings, segment=dataset.segment_samples, files=files), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CachedLatents(Dataset):
    """Wraps a WavPairsDataset: its items also hold `latents` [2, D, T], the codec latents of input and target, read
    from a memory-mapped cache.

    The cache lives in FOLDER/.latent_cache/<key>.npy, one [2, D, T] float32 entry per pair (input, output),
    written once by `build` and keyed by `cache_key`, so a changed file or codec is never served stale.
    """

    def __init__(self, dataset: WavPairsDataset, path: str):
        self.dataset, self.path = dataset, path
        self.latents = None  # opened lazily in each worker process

    @staticmethod
    def path_for(dataset: WavPairsDataset, codec_settings: dict) -> str:
        return os.path.join(dataset.folder, ".latent_cache", cache_key(dataset, codec_settings) + ".npy")

    @staticmethod
    def allocate(path: str, pairs: int, dim: int, frames: int) -> None:
        """Create the (empty) cache file [pairs, 2, dim, frames] that `fill` writes into."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(pairs, 2, dim, frames)).flush()

    @staticmethod
    @torch.no_grad()
    def fill(dataset: WavPairsDataset, codec, path: str, device, share: tuple[int, int] = (0, 1),
             progress: bool = True) -> None:
        """Encode this rank's `share` of the pairs, (rank, world size): every world_size-th batch, into the
        allocated cache `path`."""
        cache = np.load(path, mmap_mode="r+")
        frames, (rank, world_size), batch_size = cache.shape[-1], share, FILL_BATCH
        starts = range(rank * batch_size, len(dataset), world_size * batch_size)
        for start in tqdm(starts, desc="caching latents", unit="batch", disable=not progress, leave=False):
            idx = range(start, min(start + batch_size, len(dataset)))
            waves = torch.stack([torch.stack([dataset.read(p) for p in dataset.pairs[i]]) for i in idx])
            z = codec.encode(waves.flatten(0, 1).to(device)).float().cpu()
            cache[start : start + len(idx)] = z.view(len(idx), 2, codec.dim, -1)[..., :frames].numpy()
        cache.flush()

    @staticmethod
    def build(dataset: WavPairsDataset, codec, path: str, device, progress: bool = True) -> bool:
        """Encode every pair into `path` in this process unless it is there already; True when it had to encode."""
        if os.path.isfile(path):
            return False
        with replaced(path) as partial:
            CachedLatents.allocate(partial, len(dataset), codec.dim, codec.num_frames(dataset.segment_samples))
            CachedLatents.fill(dataset, codec, partial, device, progress=progress)
        return True

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int):
        if self.latents is None:
            self.latents = np.load(self.path, mmap_mode="r")
        other = self.dataset.target_index(index)
        latents = torch.from_numpy(np.stack([self.latents[index, 0], self.latents[other, 1]]))
        return {**self.dataset[index], "latents": latents}


def check_splits(config, main: bool, log) -> dict[str, WavPairsDataset]:
    """Both splits of the pairs folder, every file checked once by rank 0 (the others take its verdict), with their
    beat grids; BadDataError for bad files (unless --skip_bad_files) or an empty split."""
    c = config
    folders = {split: os.path.join(c.dataset_folder, split) for split in ("train", "val")}
    for folder in folders.values():
        if problem := path_problem(folder, "folder"):
            raise FileNotFoundError(f"pairs folder {folder}: {problem}")
    problems, datasets = [], {}
    layered = c.use_creative_agent and c.agent == "layered"
    for split, folder in folders.items():
        shuffle = split == "train" and c.shuffle_targets
        scan = [scan_pairs(folder, c.sample_rate, c.segment_samples, True, c.silence_db) if main else None]
        if main:  # a folder from before beats.json gets its grids once, before any other rank reads them
            load_beat_grids(folder, scan[0][0], c.sample_rate, True)
        if dist.is_initialized():
            dist.broadcast_object_list(scan, src=0)
        try:
            reading = Reading(shuffle, shuffle and c.align_targets, c.seed, c.skip_bad_files, c.silence_db, layered,
                              layered and c.layer_guide > 0)
            datasets[split] = WavPairsDataset(folder, c.sample_rate, c.segment_samples, reading, scan[0])
        except BadDataError as err:
            problems += err.problems
            continue
        problems += datasets[split].problems
    if problems and not c.skip_bad_files:
        raise BadDataError(problems)
    if problems:
        log(f"⚠️  skipping {len(problems)} bad file(s):\n" + str(BadDataError(problems)).split("\n", 1)[1])
    for split, dataset in datasets.items():
        if len(dataset) == 0:
            raise BadDataError([(folders[split], "no usable pairs")])
    return datasets


def cached(dataset: WavPairsDataset, codec, device, rank: int, world_size: int, log) -> CachedLatents:
    """The dataset with its latents from the cache. A missing or stale cache is filled by every rank, each encoding
    its share of the pairs, and is complete and valid when this returns."""
    path, main = CachedLatents.path_for(dataset, codec.settings), rank == 0
    missing = [not os.path.isfile(path)]  # rank 0 decides, so no rank can see the file appear half-way
    barrier = dist.barrier if dist.is_initialized() else lambda: None
    if dist.is_initialized():
        dist.broadcast_object_list(missing, src=0)
    if missing[0]:
        partial = path + ".partial.npy"
        if main:
            CachedLatents.allocate(partial, len(dataset), codec.dim, codec.num_frames(dataset.segment_samples))
        barrier()
        CachedLatents.fill(dataset, codec, partial, device, (rank, world_size), main)
        barrier()
        if main:
            os.replace(partial, path)
            log(f"Latent cache written: {path}")
    barrier()
    return CachedLatents(dataset, path)


def loader_workers(wanted: int | None, on_gpu: bool, log) -> int:
    """Data-loader workers of this rank: the CPUs it may use minus one for the training loop (none on CPU, where
    the workers would take cores from the model), never more than that."""
    spare = max(0, cpus_per_rank() - 1)
    if wanted is None:
        return spare if on_gpu else 0
    if wanted > spare:
        log(f"⚠️  --num_workers {wanted} is more than this rank's {cpus_per_rank()} CPU(s) allow: using {spare}")
    return min(wanted, spare)


class TrainingData:
    """A run's data on this rank: both splits checked (`train_set`, `val_set`: WAV pairs), what the loaders read
    (`train_data`, `val_data`: the same or their latent caches) and the loaders over this rank's share."""

    def __init__(self, config, codec, device: torch.device, rank: int, world_size: int, log=print):
        c = config
        c.segment_samples = c.segment_samples or infer_segment_samples(os.path.join(c.dataset_folder, "train"))
        self.segment_samples = c.segment_samples
        datasets = check_splits(c, rank == 0, log)
        self.train_set, self.val_set = datasets["train"], datasets["val"]
        self.train_data, self.val_data = self.train_set, self.val_set
        if c.cache_latents:
            self.train_data, self.val_data = (cached(d, codec, device, rank, world_size, log)
                                              for d in (self.train_set, self.val_set))
        pin = device.type == "cuda"
        self.workers = loader_workers(c.num_workers, pin, log)
        # a compiled step drops each epoch's last, smaller batch: one graph then serves every step
        drop_last = c.compile != "none" and len(self.train_data) // world_size > c.batch_size
        loading, share = Loading(c.batch_size, c.seed, self.workers, pin), (rank, world_size)
        self.train_loader, self.train_sampler = build_loader(self.train_data, loading, True, share, drop_last)
        self.val_loader, _ = build_loader(self.val_data, loading, False, share)

    def set_epoch(self, epoch: int) -> None:
        self.train_sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)

    def close(self) -> None:
        """Drop the loaders, which stops their worker processes now (see Trainer.close)."""
        self.train_loader = self.val_loader = None
