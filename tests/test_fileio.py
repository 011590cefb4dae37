"""`publish_target`: the one lock -> cleanup -> check -> work dir -> atomic publish sequence."""

import pytest

from kerasft.util.fileio import LockError, publish_target, target_lock


def test_publishes_the_work_directory_whole(tmp_path):
    target = tmp_path / "out"
    with publish_target(target) as work:
        (work / "a.txt").write_text("a")
        assert not target.exists()  # nothing is visible before the block ends
    assert (target / "a.txt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock or temp left


def test_an_error_leaves_the_old_target_and_no_work_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), publish_target(target, overwrite=True) as w:
        (w / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_keep_work_keeps_what_can_be_resumed(tmp_path):
    target, partial = tmp_path / "run", tmp_path / ".run.partial"
    with (
        pytest.raises(KeyError),
        publish_target(
            target, work=partial, keep_work=lambda w: (w / "checkpoint").exists()
        ) as work,
    ):
        (work / "checkpoint").write_text("epoch 3")
        raise KeyError("killed")
    assert (partial / "checkpoint").read_text() == "epoch 3" and not target.exists()
    with publish_target(target, work=partial) as work:  # resumed: the same directory
        assert (work / "checkpoint").read_text() == "epoch 3"
    assert (target / "checkpoint").exists() and not partial.exists()


def test_refuses_a_non_empty_target_and_a_second_writer(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="Pass --overwrite"), publish_target(target):
        pass
    with target_lock(target), pytest.raises(LockError, match="being written"):
        with publish_target(target, overwrite=True):
            pass
    assert (target / "keep.txt").read_text() == "x"
