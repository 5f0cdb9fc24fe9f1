"""scripts/reproduce.sh end to end on a CPU at toy size: pre-training two seeds, the distractor stage with
its control (and a sliding window's control arm), and the perplexity stage, as a GPU run chains them (results/README.md has the real commands)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _toy_reproduce(tmp_path):
    """A toy corpus and a function running one STAGE of reproduce.sh on it (CPU, tiny preset): it returns
    the completed process, and fails the test on a non-zero exit unless ``check=False``."""
    from gca.data.prepare import prepare

    src = tmp_path / "txt"
    src.mkdir()
    for i in range(8):
        (src / f"d{i}.txt").write_text(f"document {i}. " + f"the {i} quick brown fox jumps over the lazy dog; " * 80)
    prepare([str(src)], tmp_path / "data", tokenizer="embedded", val_fraction=0.5, progress=False)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RUNS": str(tmp_path / "runs"), "DATA": str(tmp_path / "data"), "PRE_DATA": str(tmp_path / "data"),
           "PRESET": "tiny", "SEQ": "252", "BATCH": "2", "DEVICE": "cpu", "DTYPE": "float32", "ARCHS": "drt", "LR": "1e-3"}

    def run(name, check=True, **kw):
        p = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce.sh")], cwd=ROOT, env={**env, "STAGE": name, **kw},
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 or not check, p.stdout + p.stderr
        return p

    return tmp_path / "runs", run


def test_reproduce_pretrain_distract_ppl(tmp_path):
    runs, run = _toy_reproduce(tmp_path)

    def stage(name, **kw):
        return run(name, **kw).stdout

    out = stage("pretrain", SEEDS="1 2", STEPS="2", DRT_SET="--set hidden_size=32 --set num_heads=2 --set intermediate_size=64",
                DRT_EXTRA="--set retrieval_copy_loss=0.1")
    assert out.count("done: step 2") == 2, out
    assert all("retrieval_copy_loss" in json.loads(line) for line in (runs / "drt-s1.jsonl").read_text().splitlines()
               if "loss" in json.loads(line))
    stage("pretrain", ARCHS="swa", SEEDS="1", STEPS="2")
    # a sliding-window run gets the control arm alone: the baseline at the same tokens
    out = stage("distract", RUN_NAMES="drt-s1 drt-s2 swa-s1", DIS_STEPS="3")
    assert out.count("done: step 3") == 5, out
    assert (runs / "swa-s1-ctl" / "ckpt").is_dir() and not (runs / "swa-s1-dis").exists()
    cfg = json.loads((runs / "swa-s1-ctl" / "ckpt" / "train_config.json").read_text())
    assert cfg["init_from"] == str(runs / "swa-s1") and cfg["seed"] == 17 and cfg["lr"] == cfg["min_lr"] == 1e-4
    for name in ("drt-s1-dis", "drt-s1-ctl", "drt-s2-dis", "drt-s2-ctl"):
        cfg = json.loads((runs / name / "ckpt" / "train_config.json").read_text())
        assert cfg["init_from"] == str(runs / name[:6]) and cfg["seed"] == 17 and cfg["lr"] == cfg["min_lr"] == 1e-4
        model = json.loads((runs / name / "ckpt" / "config.json").read_text())
        assert model["retrieval_distractors"] == (1 if name.endswith("dis") else 0)
        assert model["hidden_size"] == 32 and model["retrieval_copy_loss"] == 0.1  # the pre-trained model's config, kept
    # five models, two at a time (PPL_JOBS): every one scored
    names = ("drt-s1-dis", "drt-s1-ctl", "drt-s2-dis", "drt-s2-ctl", "swa-s1-ctl")
    stage("ppl-fixed", RUN_NAMES=" ".join(names), NAME_TAG="-stage", LENGTHS_PPL="1x,2x", PPL_WINDOWS="2", PPL_JOBS="2")
    models = {json.loads((runs / "eval" / f"{n}-ppl-fixed" / "ppl.json").read_text())[0]["model"] for n in names}
    assert models == {f"{n}-stage-tiny" for n in names}


def test_reproduce_seeds_stage_chains_and_stops_short(tmp_path):
    """STAGE=seeds-stage: pretrain, distract and ppl-fixed for ARCHS x SEEDS in one command; a run cut by its
    time limit stops the chain with a message; rerun, finished steps are skipped."""
    runs, run = _toy_reproduce(tmp_path)
    toy = dict(ARCHS="drt swa", SEEDS="3", STEPS="2", DIS_STEPS="2", LENGTHS_PPL="1x,2x", LENGTHS_COPY="1x,2x", PPL_WINDOWS="2",
               DRT_SET="--set hidden_size=32 --set num_heads=2 --set intermediate_size=64")
    p = run("seeds-stage", check=False, **toy, MIN="0.00001")  # stops at its first step
    assert p.returncode != 0 and "has not reached step 2" in p.stderr, p.stdout + p.stderr
    assert not (runs / "drt-s3-dis").exists()
    run("seeds-stage", **toy)
    made = ("drt-s3-dis", "drt-s3-ctl", "swa-s3-ctl")
    models = {json.loads((runs / "eval" / f"{n}-ppl-fixed" / "ppl.json").read_text())[0]["model"] for n in made}
    assert models == {f"{n}-stage-tiny" for n in made} and not (runs / "swa-s3-dis").exists()
    # copy-stats: the loss by copy distance of the three, the first the DRT with distractors, and each DRT's
    # retrieval hits, with the oracle's reading (COPY_ORACLE defaults to 1)
    copy = json.loads((runs / "eval" / "copy-s3.json").read_text())
    assert [r["model"] for r in copy["rows"][::6]] == ["drt", "swa", "drtctl"] and len(copy["rows"]) == 18
    for n in ("drt-s3-dis", "drt-s3-ctl"):
        hits = json.loads((runs / "eval" / f"hits-{n}.json").read_text())
        assert {r["model"] for r in hits["rows"]} == {n} and {r["bin"] for r in hits["rows"]} >= {"all", "512-4096"}
        assert {r["bin"] for r in hits["oracle"]} >= {"all", "other", "in window"}
    for n in ("drt-s3", "swa-s3") + made:  # each run's training log kept beside its console log
        assert (runs / f"{n}.jsonl").read_bytes() == (runs / n / "log.jsonl").read_bytes(), n
    logs = {n: (runs / f"{n}.log").read_text() for n in ("drt-s3", "drt-s3-dis")}
    run("seeds-stage", **toy)  # everything trained: only the scoring runs again
    assert {n: (runs / f"{n}.log").read_text() for n in logs} == logs
    # a run already at STEPS, trained again beside an unfinished one, ends its log "nothing to do"; its
    # checkpoint is at STEPS, so it counts as finished
    run("pretrain", **toy)
    assert "nothing to do" in (runs / "swa-s3.log").read_text().splitlines()[-1]
    p = run("seeds-stage", check=False, **toy)
    assert p.returncode == 0 and "has not reached" not in p.stderr, p.stdout + p.stderr


def test_copy_first_chain_base_commands(tmp_path):
    """scripts/copy_first.sh STAGE=chain-base (the equal-token runs of the chain recipe), with `python` replaced by
    a stub that records its arguments: each arch trains the two stages at the fixed step counts, the DRT's needle
    stage with two retrieval groups, the second stage from the first one's export; the default schedule runs each
    stage's cosine to its end (--max-steps = the step count), CHAIN_SCHEDULE=cut lays it out over 6000 steps and
    stops at the step count (--stop-at), as the thirtieth run's time limits stopped its DRT."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text('#!/bin/bash\necho "$@" >> "$CALLS"\necho "done: step 99999"\n')
    stub.chmod(0o755)

    def commands(**kw):
        runs, calls = tmp_path / f"runs-{len(kw)}", tmp_path / f"calls-{len(kw)}.txt"
        for run in ("copy-swa1kc", "copy-drt1kc", "copy-swa-ch4ka", "copy-drt-ch4ka"):  # what the stub's exports would write
            (runs / "export" / run).mkdir(parents=True)
            (runs / "export" / run / "model.safetensors").touch()
        env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls),
               "RUNS": str(runs), "STAGE": "chain-base", "BASE_ARCHS": "swa drt", "MIN": "9", **kw}
        p = subprocess.run(["bash", str(ROOT / "scripts" / "copy_first.sh")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        train = [line.split() for line in calls.read_text().splitlines() if line.startswith("-m gca.cli train")]
        return {a[a.index("--out") + 1].rsplit("/", 1)[1]: a for a in train}

    def arg(a, name):  # the value of the last one given, as argparse takes it
        return a[max(i for i, x in enumerate(a) if x == name) + 1] if name in a else None

    for kw, steps in (({}, ("1483", "3724")), ({"CHAIN_SCHEDULE": "cut"}, ("6000", "6000"))):
        runs = commands(**kw)
        assert sorted(runs) == ["copy-drt-ch4ka", "copy-drt1kc", "copy-swa-ch4ka", "copy-swa1kc"]
        for a in ("swa", "drt"):
            first, second = runs[f"copy-{a}1kc"], runs[f"copy-{a}-ch4ka"]
            assert (arg(first, "--max-steps"), arg(second, "--max-steps")) == steps
            assert (arg(first, "--stop-at"), arg(second, "--stop-at")) == (("1483", "3724") if kw else (None, None))
            assert (arg(first, "--seq-len"), arg(second, "--seq-len")) == ("1008", "4032")
            assert arg(second, "--init-from").endswith(f"export/copy-{a}1kc") and arg(second, "--lr") == "5e-4"
            assert arg(first, "--arch") == arg(second, "--arch") == (None if a == "drt" else a)
            assert ("upper_groups=[2,2]" in second) == (a == "drt") and "upper_groups=[2,2]" not in first


def test_copy_first_edge_ft_commands(tmp_path):
    """scripts/copy_first.sh STAGE=edge-ft (the thirty-sixth run), `python` stubbed: two fine-tunes of FT_FROM side by
    side whose commands differ only in their --out and in the edge share of their data, then each exported; without
    FT_FROM it stops with a message that names it."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text('#!/bin/bash\necho "$@" >> "$CALLS"\necho "done: step 1200, checkpoint in x"\n')
    stub.chmod(0o755)
    runs, calls = tmp_path / "runs", tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls),
           "RUNS": str(runs), "STAGE": "edge-ft", "FT_SEED": "13"}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "copy_first.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "FT_FROM" in p.stderr
    env["FT_FROM"] = "runs/cb/export/copy-drt-ch4ka"
    p = subprocess.run(["bash", str(ROOT / "scripts" / "copy_first.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = calls.read_text().splitlines()
    train = {a[a.index("--out") + 1].rsplit("/", 1)[1]: a for a in (x.split() for x in lines)
             if a[:3] == ["-m", "gca.cli", "train"]}
    assert sorted(train) == ["ctl-s13", "edge-s13"]
    edge, ctl = train["edge-s13"], train["ctl-s13"]
    data = [a.index("--data") + 1 for a in (edge, ctl)]
    assert edge[data[0]] == ctl[data[1]] + ";edge=0.1" and "edge=" not in ctl[data[1]]
    for a in (edge, ctl):
        assert a[a.index("--init-from") + 1] == "runs/cb/export/copy-drt-ch4ka" and a[a.index("--seed") + 1] == "13"
    rest = [[x for i, x in enumerate(a) if i != d and x != a[a.index("--out") + 1]] for a, d in zip((edge, ctl), data)]
    assert rest[0] == rest[1]
    exports = [x for x in lines if "export_model" in x]
    assert len(exports) == 2 and any("export/edge-s13" in x for x in exports) and any("export/ctl-s13" in x for x in exports)
