"""One definition of silence by level, clear words for path mistakes, no import circle. One
home for each concept (sizes, scripts not imported, every flag read, one configuration)."""
import ast
import os

import numpy as np
import pytest
import soundfile as sf
from conftest import ROOT, SR, tiny_args

import arrange
import evaluate
import make_pairs
import pairs_dataset
import pairs_folder
from beats import level_db
from pairs_dataset import SILENCE_DB, path_problem, silence_problem
from train_simple_worker import run


def noise_floor(seconds=1.0, rms_db=-91.0, peak_db=-78.0, seed=0):
    """A recording of 'silence': a codec's noise floor, RMS `rms_db` with clicks up to `peak_db`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(seconds * SR)) * 10 ** (rms_db / 20)
    x[:: SR // 4] = 10 ** (peak_db / 20)
    return x.astype(np.float32)


QUIET = {"noise floor": noise_floor(), "-80 dBFS noise": noise_floor(rms_db=-80.0, peak_db=-70.0),
         "digital silence": np.zeros(SR, dtype=np.float32)}


@pytest.mark.parametrize("name", list(QUIET))
def test_silence_is_judged_by_level(name):
    assert level_db(QUIET[name]) < SILENCE_DB == -60.0
    assert "silent" in silence_problem(QUIET[name])
    music = noise_floor(rms_db=-30.0, peak_db=-10.0)
    assert silence_problem(music) is None
    assert silence_problem(music, silence_db=-20.0) is not None  # the level is a setting


@pytest.mark.parametrize("name", list(QUIET))
def test_arrange_and_evaluate_refuse_silent_songs(tmp_path, name, capsys, pairs_dir):
    from test_listen import song

    quiet = str(tmp_path / "quiet.wav")
    sf.write(quiet, QUIET[name], SR, subtype="FLOAT")
    args = tiny_args(tmp_path, pairs_dir, "--mask_type", "temporal")
    assert run(0, 1, 0, args) == 0
    ckpt = str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt")
    out = tmp_path / "out.wav"
    good = song(tmp_path / "good.wav", 1.0, SR)
    assert arrange.main(["--checkpoint", ckpt, "--input", quiet, "--target", good, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "quiet.wav" in err and "silent" in err and not out.exists()
    val = tmp_path / "pairs" / "val"
    val.mkdir(parents=True)
    sf.write(str(val / "pair_0000_input.wav"), np.resize(QUIET[name], 4000), SR)
    sf.write(str(val / "pair_0000_output.wav"), sf.read(good)[0][:4000], SR)
    report = tmp_path / "eval"
    assert evaluate.main(["--checkpoints", f"t={ckpt}", "--dataset_folder", str(tmp_path / "pairs"),
                          "--out", str(report)]) == 2
    err = capsys.readouterr().err
    assert "pair_0000_input.wav" in err and "silent" in err and not report.exists()


def test_make_pairs_skips_and_counts_silent_songs(tmp_path):
    loud = lambda: pairs_folder.synth_song(1, 2.0, SR)  # noqa: E731
    songs = [("loud_a", loud), ("loud_b", loud)]
    songs += [(name, lambda x=x: np.resize(x, 2 * SR)) for name, x in QUIET.items()]
    summary = pairs_folder.make_pairs(songs, str(tmp_path / "pairs"), pairs_folder.Cutting(0.5, SR, 0.5),
                                      progress=False)
    assert summary.skipped["silent pairs"] == 3 * len(QUIET)  # every segment of a silent song is silent
    assert "skipped: 9 silent pairs" in summary.report()
    assert sum(summary.pairs.values()) == 6  # two loud songs of four segments: three pairs each


def test_pairs_check_refuses_a_silent_file_by_name(tmp_path, capsys):
    from conftest import tiny_pairs

    folder = tiny_pairs(str(tmp_path / "pairs"))
    victim = os.path.join(folder, "train", "pair_0001_output.wav")
    sf.write(victim, np.resize(QUIET["noise floor"], sf.info(victim).frames), SR)
    assert run(0, 1, 0, tiny_args(tmp_path, folder)) == 2
    err = capsys.readouterr().err
    assert "pair_0001_output.wav: silent (RMS" in err
    assert not (tmp_path / "ckpt").exists()


def test_path_mistakes_get_clear_words(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    afile = tmp_path / "a_file.txt"
    afile.write_text("x")
    assert path_problem(str(tmp_path / "missing.wav")) == "does not exist"
    assert path_problem(str(folder)) == "is a folder, but a file is expected here"
    assert path_problem(str(afile), "folder") == "is a file, but a folder is expected here"
    monkeypatch.setattr(pairs_dataset.os, "access", lambda path, mode: False)  # root reads everything
    assert path_problem(str(afile)) == "no permission to read it"
    monkeypatch.undo()
    out = tmp_path / "out.wav"
    assert arrange.main(["--checkpoint", str(folder), "--input", str(afile), "--target", str(afile),
                         "--output", str(out)]) == 2
    assert "a_folder: is a folder" in capsys.readouterr().err
    assert evaluate.main(["--checkpoints", f"x={folder}", "--out", str(tmp_path / "e")]) == 2
    assert "a_folder: is a folder" in capsys.readouterr().err
    assert make_pairs.main(["--from_folder", str(afile), "--out", str(tmp_path / "p")]) == 2
    assert "a_file.txt: is a file, but a folder" in capsys.readouterr().err
    assert run(0, 1, 0, tiny_args(tmp_path, str(afile))) == 2
    assert "a_file.txt" in capsys.readouterr().err


def test_arrange_names_a_folder_given_as_input(tmp_path, capsys, pairs_dir):
    assert run(0, 1, 0, tiny_args(tmp_path, pairs_dir, "--mask_type", "temporal")) == 0
    ckpt = str(tmp_path / "ckpt" / "run" / "checkpoint_last.pt")
    out = tmp_path / "out.wav"
    assert arrange.main(["--checkpoint", ckpt, "--input", str(tmp_path), "--target", str(tmp_path),
                         "--output", str(out)]) == 2
    assert f"{tmp_path}: is a folder, but a file is expected here" in capsys.readouterr().err


def local_imports(path: str, modules: set[str]) -> set[str]:
    """The project's modules that `path` imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & modules


def test_no_import_circle():
    modules = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    graph = {m: local_imports(os.path.join(ROOT, f"{m}.py"), modules) - {m} for m in modules}
    assert "train_simple_worker" not in graph["arrange"] | graph["evaluate"]
    state = {}

    def visit(module, trail):
        if state.get(module) == "open":
            raise AssertionError("import circle: " + " -> ".join(trail + [module]))
        if state.get(module) == "done":
            return
        state[module] = "open"
        for other in sorted(graph[module]):
            visit(other, trail + [module])
        state[module] = "done"

    for module in sorted(modules):
        visit(module, [])


def project_files() -> list[str]:
    return sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))


def test_no_class_over_250_lines_and_no_function_over_60():
    """Small pieces, each with one job (argument parsing included)."""
    too_long = []
    for path in [os.path.join(ROOT, f) for f in project_files()] + [
            os.path.join(ROOT, "tests", f) for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")]:
        for node in ast.walk(ast.parse(open(path).read())):
            limit = 250 if isinstance(node, ast.ClassDef) else 60
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{os.path.basename(path)}:{node.lineno} {node.name} "
                                f"({node.end_lineno - node.lineno + 1} lines)")
    assert not too_long, too_long


def test_no_forward_result_is_read_back_from_a_module():
    """What a forward computes comes back in its record (records.py): an attribute named last_* that a module
    sets on itself is read in that module only, never by its callers or the tests."""
    test_files = [os.path.join("tests", f) for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")]
    trees = {f: ast.parse(open(os.path.join(ROOT, f)).read()) for f in project_files() + test_files}
    written = {f: {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                   and n.attr.startswith("last_")} for f, tree in trees.items()}
    read_elsewhere = sorted(f"{f}:{n.lineno} .{n.attr}" for f, tree in trees.items() for n in ast.walk(tree)
                            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)
                            and n.attr.startswith("last_") and n.attr not in written[f])
    assert not read_elsewhere, read_elsewhere


def parameter_count(node: ast.FunctionDef) -> int:
    """A function's named parameters, `self` and `cls` aside (*args and **options are one door, not counted)."""
    args = node.args
    named = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return len(named) - (named[:1] in (["self"], ["cls"]))


# the seed's keyword constructor stays as its users know it (records and their front doors may be long)
FRONT_DOORS = {"model_simple_transformer.py SimpleTransformer.__init__"}


def test_no_function_takes_more_than_six_parameters():
    """Options travel as typed records (records.Conditions, inference.Request, config.Config), not as long
    argument lists that every caller must thread through."""
    too_many = []
    for name in project_files():
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        owners = {id(f): c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and parameter_count(node) > 6:
                where = f"{name} {owners[id(node)] + '.' if id(node) in owners else ''}{node.name}"
                if where not in FRONT_DOORS:
                    too_many.append(f"{where} ({parameter_count(node)})")
    assert not too_many, too_many


def test_no_command_line_script_is_imported_by_a_module():
    """A script (a module with main()) is an entry point only: library code lives in modules that it imports."""
    modules = {f[:-3] for f in project_files()}
    scripts = {m for m in modules if "def main(" in open(os.path.join(ROOT, f"{m}.py")).read()}
    assert {"arrange", "evaluate", "make_pairs", "plot_training", "bench", "train_simple_ddp"} <= scripts
    importers = {m: local_imports(os.path.join(ROOT, f"{m}.py"), scripts) - {m} for m in modules}
    assert not {m: found for m, found in importers.items() if found}


def test_every_flag_of_the_configuration_is_read_by_the_code():
    """A flag goes command line -> config.Config field -> the code that reads `.NAME`: no flag is dead weight."""
    from dataclasses import fields

    from config import Config

    code = "".join(open(os.path.join(ROOT, f)).read() for f in project_files() if f != "config.py")
    unread = [f.name for f in fields(Config) if f.metadata.get("group") and f".{f.name}" not in code]
    assert not unread, f"flags that no code reads: {unread}"


def test_one_configuration_from_the_command_line_to_old_checkpoints(capsys):
    """Flags users type keep working, the masks are one choice, and `upgrade` completes an old checkpoint's dict."""
    from config import LEGACY, parse_args, upgrade

    config = parse_args(["--num_transformer_layers", "3", "--epochs", "7", "--nhead", "2", "4", "2"])
    assert (config.num_stages, config.num_epochs, config.nhead) == (3, 7, [2, 4, 2])
    assert config.masks == "none" and config.run_name.startswith("none_")
    assert parse_args(["--agent", "compositional"]).use_creative_agent  # --agent KIND chooses the agent
    assert not parse_args(["--agent_gates", "cell"]).use_creative_agent  # a prefix of --agent is not --agent
    with pytest.raises(SystemExit):
        parse_args(["--use_creative_agent", "true", "--mask_type", "temporal"])
    assert "--mask_type temporal is a rule for runs without the agent" in capsys.readouterr().err
    saved = parse_args(["--use_creative_agent", "true"]).to_dict()
    saved["num_transformer_layers"] = saved.pop("num_stages")  # as checkpoints before the rename have it
    for key in ("section_beats", "agent_block_frames", "far_lsd_weight"):
        del saved[key]
    saved["use_discriminator"] = False  # a setting no version reads any more
    old = upgrade(saved)
    assert old.num_stages == 2 and old.section_beats == 0 and old.agent_block_frames == 0
    assert old.far_lsd_weight == LEGACY["far_lsd_weight"] == 0.0 and not hasattr(old, "use_discriminator")
    today = parse_args(["--run_name", "r", "--agent_scales", "1,4"])
    assert upgrade(today.to_dict()) == today  # what a checkpoint stores comes back as it was
