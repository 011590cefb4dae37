"""Runs that survive: kill and resume, one writer per target, nothing lost after training,
best-epoch selection, callbacks on the real model, run directories written without the CLI."""

import errno
import json
import os
import shlex
import signal
import subprocess

import keras
import numpy as np
import pytest

from conftest import BACKENDS, CLI_ENV, fit_args, fit_run, toy_texts
from kerasft.cli import main
from kerasft.exporters import export
from kerasft.runs import rundir
from kerasft.training.checkpoint import STATE_FILE, CheckpointMismatchError
from kerasft.training.tuner import TwoStageFineTuner, load_tuner
from kerasft.util.fileio import LockError, remove_stale_temp_dirs, target_lock


def _weights(run_dir):
    model = keras.saving.load_model(run_dir / rundir.MODEL_FILE)
    return [keras.ops.convert_to_numpy(v) for v in model.weights]


def _max_diff(a, b):
    assert len(a) == len(b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


# Runs `kerasft fit` with `CheckpointDir.save` wrapped to SIGKILL the process right after the
# checkpoint of (stage, epochs_done) is written: a crash at a chosen point, no polling race.
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from kerasft.training import checkpoint
stage, done = sys.argv.pop(1), int(sys.argv.pop(1))
save = checkpoint.CheckpointDir.save
def save_then_die(self, state, *args, **kwargs):
    save(self, state, *args, **kwargs)
    if state["stage"] == stage and state["epochs_done"] == done:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.CheckpointDir.save = save_then_die
from kerasft.cli import main
sys.exit(main())
"""


def _killed_after(args, out, stage: str, epochs_done: int) -> dict:
    """Runs `kerasft fit` (`args`), killed by SIGKILL once the checkpoint after `epochs_done`
    epochs (counted over both stages) of `stage` is on disk; returns that checkpoint's state."""
    assert args[1:3] == ["-m", "kerasft"], args
    killed = [args[0], "-c", KILL_AFTER_CHECKPOINT, stage, str(epochs_done), *args[3:]]
    # the wrapper imports Keras before the CLI reads --backend: name the backend beforehand
    env = {**CLI_ENV, "KERAS_BACKEND": args[args.index("--backend") + 1]}
    proc = subprocess.run(killed, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not out.exists(), "a killed run must not look finished"
    state_path = rundir.partial_dir(out) / rundir.CHECKPOINT_DIR / STATE_FILE
    return json.loads(state_path.read_text())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_sigkill_in_stage_2_then_resume_matches_uninterrupted(
    backend, toy_runs, tiny_preset, toy_data, tmp_path
):
    out = tmp_path / "run"
    args = fit_args(backend, tiny_preset, toy_data, out)  # the toy_runs recipe: 2 + 8 epochs
    state = _killed_after(args, out, "finetune", 5)
    assert (state["stage"], state["epochs_done"]) == ("finetune", 5), state
    # jax: the same command again resumes; tensorflow and torch: the explicit --resume.
    again = args if backend == "jax" else [*args[:3], "fit", "--resume", str(out)]
    proc = subprocess.run(again, env=CLI_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "5 of 10 epochs done (finetune)" in proc.stderr
    assert _max_diff(_weights(out), _weights(toy_runs[backend])) <= 1e-6
    assert not rundir.partial_dir(out).exists()
    history = json.loads((out / rundir.HISTORY_FILE).read_text())
    uninterrupted = json.loads((toy_runs[backend] / rundir.HISTORY_FILE).read_text())
    assert history["stage"] == [1, 1] + [2] * 8
    np.testing.assert_allclose(history["loss"], uninterrupted["loss"], rtol=1e-6)


@pytest.mark.slow
def test_sigkill_in_stage_1_then_resume_matches_uninterrupted(tiny_preset, toy_data, tmp_path):
    recipe = {"warmup_epochs": 6, "finetune_epochs": 1}
    reference = fit_run("tensorflow", tiny_preset, toy_data, tmp_path / "ref", **recipe)
    out = tmp_path / "run"
    args = fit_args("tensorflow", tiny_preset, toy_data, out, **recipe)
    state = _killed_after(args, out, "warmup", 2)
    assert (state["stage"], state["epochs_done"]) == ("warmup", 2), state
    proc = subprocess.run(args, env=CLI_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 of 7 epochs done (warmup)" in proc.stderr
    assert _max_diff(_weights(out), _weights(reference)) <= 1e-6


@pytest.mark.slow
def test_a_second_fit_on_a_held_target_is_refused_then_runs(tiny_preset, toy_data, tmp_path):
    """The lock race made deterministic: this test process holds the target's lock (as a
    running `kerasft fit` does) while a second fit starts, and releases it afterwards."""
    out = tmp_path / "run"
    args = fit_args("tensorflow", tiny_preset, toy_data, out, 1, 2)
    with target_lock(out, "Run directory"):
        refused = subprocess.run(args, env=CLI_ENV, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"is being written by another kerasft process (pid {os.getpid()} on" in refused.stderr
    # one line from kerasft and no traceback (TensorFlow's native start-up lines may precede it)
    assert "Traceback" not in refused.stderr, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.startswith("kerasft")]
    assert len(lines) == 1 and "is being written by another" in lines[0], refused.stderr
    assert not out.exists() and not rundir.partial_dir(out).exists()  # it touched nothing
    proc = subprocess.run(args, env=CLI_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"model.keras", "metrics.json", "config.json"}
    TwoStageFineTuner.load(out / rundir.MODEL_FILE).predict(["a good day"])


def test_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path, caplog):
    target = tmp_path / "out"
    with target_lock(target, "Export directory"):
        with pytest.raises(LockError, match=rf"Export directory .* \(pid {os.getpid()} on "):
            with target_lock(target, "Export directory"):
                pass
    assert not (tmp_path / ".out.lock").exists()  # released and removed
    (tmp_path / ".out.lock").write_text("pid 4194999 on gone-host")  # left by a killed writer
    (tmp_path / ".out.tmp-abc123").mkdir()  # and its temporary directory
    with caplog.at_level("WARNING"), target_lock(target):
        assert remove_stale_temp_dirs(target) == [tmp_path / ".out.tmp-abc123"]
    assert "taking over the lock left by pid 4194999 on gone-host" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def toy_jsonl(tmp_path):
    texts, labels = toy_texts(200, seed=3)
    path = tmp_path / "toy.jsonl"
    rows = zip(texts, labels, strict=True)
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path


def _fit_main(preset, data, out, *extra):
    args = ["fit", "--data", str(data), "--out", str(out), "--preset", str(preset), "--quiet"]
    args += ["--sequence-length", "32", "--batch-size", "16", "--warmup-epochs", "1"]
    args += ["--finetune-epochs", "3", "--finetune-lr", "3e-3", *extra]
    return main(args)


@pytest.mark.slow
def test_failure_after_training_keeps_the_model_and_resume_finishes(
    tiny_preset, toy_jsonl, tmp_path, monkeypatch, capsys, caplog
):
    out = tmp_path / "run"
    real_write = rundir._write_json

    def disk_full(path, obj):
        if path.name == rundir.METRICS_FILE:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, obj)

    monkeypatch.setattr(rundir, "_write_json", disk_full)
    assert _fit_main(tiny_preset, toy_jsonl, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    model = rundir.partial_dir(out) / rundir.MODEL_FILE
    assert err.startswith("kerasft fit: error: OSError: [Errno 28] No space left on device")
    assert f"The trained model is saved: {model};" in err and "--resume" in err
    tuner = TwoStageFineTuner.load(model)
    assert tuner.predict(["a good day", "a bad day"]).shape == (2,)
    assert not out.exists()

    # Other options on the same target are refused while the interrupted run is there.
    monkeypatch.setattr(rundir, "_write_json", real_write)
    assert _fit_main(tiny_preset, toy_jsonl, out, "--seed", "7") == 2
    assert "--seed 30 -> 7" in capsys.readouterr().err

    # --resume finishes the run from the final checkpoint, without training again.
    with caplog.at_level("INFO", logger="kerasft"):
        assert main(["fit", "--resume", str(out), "--quiet"]) == 0
    assert "resuming from" in caplog.text and "4 of 4 epochs done" in caplog.text
    assert "Epoch " not in capsys.readouterr().out
    metrics = json.loads((out / rundir.METRICS_FILE).read_text())
    assert metrics["rows"]["train"] == 120 and metrics["test"]["rows"] == 40
    kept = [keras.ops.convert_to_numpy(v) for v in tuner.model.weights]
    assert _max_diff(_weights(out), kept) == 0


@pytest.mark.slow
def test_select_best_f1_keeps_the_best_epoch(tiny_preset, toy_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    assert _fit_main(tiny_preset, toy_jsonl, out, "--select-best", "f1") == 0
    metrics = json.loads((out / rundir.METRICS_FILE).read_text())
    history = json.loads((out / rundir.HISTORY_FILE).read_text())
    kept = metrics["selected_epoch"]
    stage2 = [i for i, s in enumerate(history["stage"]) if s == 2]
    best = max(stage2, key=lambda i: (history["val_f1"][i], -i))
    assert kept["epoch"] == best + 1 and kept["stage"] == 2
    assert kept["val_f1"] == pytest.approx(max(history["val_f1"][i] for i in stage2))
    assert "select_best='f1'" in kept["reason"]
    # The kept weights are that epoch's: validation F1 scored now equals the logged one.
    assert metrics["validation"]["f1"] == pytest.approx(kept["val_f1"], abs=1e-6)
    config = json.loads((out / rundir.CONFIG_FILE).read_text())
    assert config["recipe"]["select_best"] == "f1"
    assert config["data"]["sha256"] == rundir.sha256_of(toy_jsonl)


def test_early_stopping_and_select_best_need_validation(tiny_preset):
    with pytest.raises(ValueError, match="select_best='loss'.*validation_data=None"):
        TwoStageFineTuner(tiny_preset, select_best="loss").fit(*toy_texts(40))
    with pytest.raises(ValueError, match="select_best must be one of"):
        TwoStageFineTuner(tiny_preset, select_best="auc")
    with pytest.raises(ValueError, match="early_stopping_patience must be an int >= 1 or None"):
        TwoStageFineTuner(tiny_preset, early_stopping_patience=0)


@pytest.mark.slow
def test_early_stopping_stops_stage_2(tiny_preset):
    texts, labels = toy_texts(160, seed=4)
    tuner = TwoStageFineTuner(
        tiny_preset, sequence_length=32, batch_size=16, warmup_epochs=1, finetune_epochs=30,
        finetune_learning_rate=3e-3, select_best="accuracy", early_stopping_patience=2, verbose=0,
    )  # fmt: skip
    history = tuner.fit(texts[:120], labels[:120], validation_data=(texts[120:], labels[120:]))
    stopped, kept = tuner.selected_epoch["stopped_early"], tuner.selected_epoch["epoch"]
    assert stopped is not None and len(history.history["stage"]) == stopped < 31
    val_acc = history.history["val_accuracy"]
    assert stopped == kept + 2  # two epochs without a better validation accuracy
    assert max(val_acc[kept:]) <= val_acc[kept - 1] == max(val_acc[1:])


@pytest.mark.slow
def test_user_callbacks_see_the_whole_classifier(tiny_preset, tmp_path):
    texts, labels = toy_texts(96, seed=2)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.keras"))
    tuner = TwoStageFineTuner(
        tiny_preset, sequence_length=32, batch_size=16, warmup_epochs=1, finetune_epochs=1,
        callbacks=[checkpoint], verbose=0,
    )  # fmt: skip
    tuner.fit(texts, labels)
    for epoch in (1, 2):  # stage 1 (head on cached features) and stage 2
        model = keras.saving.load_model(tmp_path / f"epoch{epoch}.keras")
        assert model.predict(["a good day", "a bad day"], verbose=0).shape == (2, 2)
    final = keras.saving.load_model(tmp_path / "epoch2.keras")
    # the same weights (float32 variables); under the `auto` default on a bf16 CPU the callback's
    # classifier computes in bfloat16, the returned model in float32, so compare the weights
    for saved, returned in zip(final.weights, tuner.model.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(saved),
                                      keras.ops.convert_to_numpy(returned))  # fmt: skip


class _ChangeHeadAtTrainEnd(keras.callbacks.Callback):
    """Changes the weights after the last validation (as restoring a best epoch would)."""

    def on_train_end(self, logs=None):
        if self.model.output_dense.bias.shape == (2,):
            self.model.output_dense.bias.assign(np.array([-1e4, 1e4], "float32"))


@pytest.mark.slow
def test_validation_scores_are_reused_only_for_the_weights_that_were_scored(tiny_preset):
    texts, labels = toy_texts(96, seed=4)
    val = (texts[64:], labels[64:])
    kw = dict(sequence_length=32, batch_size=16, warmup_epochs=0, finetune_epochs=1, verbose=0)
    tuner = TwoStageFineTuner(tiny_preset, callbacks=[_ChangeHeadAtTrainEnd()], **kw)
    tuner.fit(texts[:64], labels[:64], validation_data=val)
    all_positive = [[0, 16], [0, 16]]
    if tuner._validated is not None:  # fit's pass scored other weights, with other answers
        assert tuner._validated[2].tolist() != all_positive
    # the head now answers "1" for every row: `score` predicts, it does not return fit's pass
    assert tuner.score(*val)["confusion_matrix"] == all_positive


def test_checkpoint_of_another_run_is_refused(tiny_preset, tmp_path):
    texts, labels = toy_texts(64, seed=1)
    kw = dict(sequence_length=32, batch_size=16, warmup_epochs=1, finetune_epochs=0, verbose=0)
    TwoStageFineTuner(tiny_preset, **kw).fit(texts, labels, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="written by a different run.*recipe"):
        TwoStageFineTuner(tiny_preset, seed=1, **kw).fit(texts, labels, checkpoint_dir=tmp_path)


@pytest.mark.slow
def test_save_run_without_the_cli_and_changed_data_is_refused(tiny_preset, toy_jsonl, tmp_path):
    from kerasft.data import load_dataset

    texts, labels = toy_texts(96, seed=6)
    tuner = TwoStageFineTuner(tiny_preset, sequence_length=32, batch_size=16, warmup_epochs=1,
                              finetune_epochs=1, verbose=0)  # fmt: skip
    tuner.fit(texts[:64], labels[:64])
    run = tuner.save_run(tmp_path / "api-run", validation=(texts[64:80], labels[64:80]),
                         test=(texts[80:], labels[80:]))  # fmt: skip
    train, val, test = rundir.run_splits(run)
    assert (len(train), len(val), len(test)) == (0, 16, 16) and test.texts == texts[80:]
    metrics = json.loads((run / rundir.METRICS_FILE).read_text())
    assert metrics["test"]["rows"] == 16
    assert load_tuner(run).predict(texts[80:82]).shape == (2,)
    exported = export(run, tmp_path / "api-export", format="onnx")  # verifies on the stored splits
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["verification"]["texts"] == 32

    data = tmp_path / "data.jsonl"
    data.write_bytes(toy_jsonl.read_bytes())
    source = rundir.DataSource.from_file(data, text_column="text", label_column="label")
    splits = source.splits()
    run2 = tuner.save_run(tmp_path / "file-run", validation=splits[1], test=splits[2],
                          source=source)  # fmt: skip
    assert [len(s) for s in rundir.run_splits(run2)] == [120, 40, 40]
    with data.open("a") as f:
        f.write(json.dumps({"text": "one more good day", "label": 1}) + "\n")
    with pytest.raises(rundir.DataChangedError, match="has changed since the fit"):
        rundir.run_splits(run2)
    code = main(["export", str(run2), "--format", "onnx", "--out", str(tmp_path / "exp")])
    assert code == 2 and not (tmp_path / "exp").exists()
    assert len(load_dataset(data)) == 201


def test_skip_invalid_runs_rebuild_their_splits(tmp_path):
    texts, labels = toy_texts(100, seed=2)
    rows = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
    rows[7]["label"] = ""
    path = tmp_path / "gaps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = rundir.DataSource.from_file(path, skip_invalid=True)
    assert [len(s) for s in source.splits()] == [59, 20, 20]
    with pytest.raises(ValueError, match="line 8: missing label"):
        rundir.DataSource.from_file(path).splits()


def test_one_tuner_fits_twice_on_data_with_more_classes(tiny_preset, tmp_path):
    texts, labels = toy_texts(64, seed=8)
    tuner = TwoStageFineTuner(tiny_preset, sequence_length=32, batch_size=16, warmup_epochs=1,
                              finetune_epochs=0, verbose=0)  # fmt: skip
    tuner.fit(texts, labels)
    assert tuner.num_classes == 2 and tuner.get_config()["num_classes"] is None
    three = [f"c{i % 3}" for i in range(64)]
    tuner.fit(texts, three)
    assert tuner.num_classes == 3 and tuner.label_names == ["c0", "c1", "c2"]
    assert tuner.predict_proba(texts[:2]).shape == (2, 3)
    tuner.save(tmp_path / "m.keras")
    loaded = TwoStageFineTuner.load(tmp_path / "m.keras")
    assert loaded.num_classes == 3 and loaded.score(texts, three)["rows"] == 64


def test_split_seed_is_recorded_and_rebuilds_other_splits(tmp_path):
    texts, labels = toy_texts(100, seed=2)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                            for t, y in zip(texts, labels, strict=True)))  # fmt: skip
    reference = rundir.DataSource.from_file(path)
    other = rundir.DataSource.from_file(path, split_seed=7)
    assert reference.split_seed == 30
    assert rundir.DataSource.from_dict(other.to_dict()).splits()[2].texts == other.splits()[2].texts
    assert other.splits()[2].texts != reference.splits()[2].texts


@pytest.mark.slow
def test_a_full_disk_during_fit_is_one_line_and_the_run_resumes(tiny_preset, toy_data, tmp_path):
    """`--out` on a 300 kB file system: a checkpoint or two fit, then one fails. Before, h5py's
    clean-up of the half-written checkpoint crashed the process (exit 139); now the error is one
    line naming the directory and `--resume`, and the run resumes once there is room."""
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"needs a mount namespace for a small tmpfs: {probe.stderr.decode()[:200]}")
    small = tmp_path / "small"
    small.mkdir()
    fit = shlex.join(fit_args("torch", tiny_preset, toy_data, small / "run", 2, 2))
    script = f"""
        mount -t tmpfs -o size=300k tmpfs {small}
        {fit} 2> {tmp_path}/first.err; echo "first=$?"
        cat {small}/.run.partial/checkpoint/state.json > {tmp_path}/state.json
        mount -o remount,size=20m {small}
        {fit} 2> {tmp_path}/second.err; echo "second=$?"
        ls {small}/run
    """
    proc = subprocess.run(["unshare", "--mount", "--map-root-user", "bash", "-c", script],
                          capture_output=True, text=True, env=CLI_ENV, timeout=600)  # fmt: skip
    assert "first=2" in proc.stdout, proc.stdout + (tmp_path / "first.err").read_text()[-3000:]
    first = (tmp_path / "first.err").read_text()
    errors = [line for line in first.splitlines() if line.startswith("kerasft fit: error:")]
    assert len(errors) == 1 and "Traceback" not in first and "Exception ignored" not in first
    assert errors[0].startswith(
        f"kerasft fit: error: no space left on device while writing the run in "
        f"{small}/.run.partial (errno 28). It is kept up to its last complete checkpoint ("
    )
    assert errors[0].endswith(f"then `kerasft fit --resume {small}/run` continues it.")
    done = json.loads((tmp_path / "state.json").read_text())["epochs_done"]
    assert 1 <= done < 4
    second = (tmp_path / "second.err").read_text()
    assert "second=0" in proc.stdout, second[-3000:]
    assert f"{done} of 4 epochs done" in second and "model.keras" in proc.stdout


def test_a_format_1_checkpoint_still_restores(tmp_path):
    """Checkpoints written before the `.npz` format (Keras' `.weights.h5` beside a `.state.npz`
    of optimizer, seed and random states) restore into the model, best epoch included."""
    from kerasft.training.checkpoint import FORMAT_1_BEST, CheckpointDir

    def model(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((4,))
        hidden = keras.layers.Dropout(0.1, seed=seed)(keras.layers.Dense(8)(inputs))
        return keras.Model(inputs, keras.layers.Dense(2)(hidden))

    saved, fresh = model(1), model(2)
    saved.save_weights(tmp_path / "epoch-0001-warmup.weights.h5")
    saved.save_weights(tmp_path / FORMAT_1_BEST)
    seeds = [v for v in saved.non_trainable_variables if v.name == "seed_generator_state"]
    seeds = [keras.ops.convert_to_numpy(v) + 7 for v in seeds]
    extra = {f"seed/{i}": s for i, s in enumerate(seeds)}
    np.savez(tmp_path / "epoch-0001-warmup.state.npz", **extra, **{"rng/torch": np.zeros(0, "u1")})
    state = {"format": 1, "stage": "warmup", "epochs_done": 1, "python_random": None,
             "weights": "epoch-0001-warmup.weights.h5",
             "extra": "epoch-0001-warmup.state.npz"}  # fmt: skip
    store = CheckpointDir(tmp_path, {})
    assert _max_diff(_numpy(saved.weights), _numpy(fresh.weights)) > 0
    store.restore(state, fresh)
    assert _max_diff(_numpy(saved.weights), _numpy(fresh.weights)) == 0
    restored_seeds = [v for v in fresh.non_trainable_variables if v.name == "seed_generator_state"]
    assert seeds and all((keras.ops.convert_to_numpy(v) == s).all()
                         for v, s in zip(restored_seeds, seeds, strict=True))  # fmt: skip
    other = model(3)
    store.restore_best(other)  # no best.npz yet: the format-1 best epoch
    assert _max_diff(_numpy(saved.weights), _numpy(other.weights)) == 0


def _numpy(variables):
    return [keras.ops.convert_to_numpy(v) for v in variables]
