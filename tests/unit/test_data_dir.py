"""A worker's data folder (streams/adapters/faust.py): a sweep by a worker starting at the same moment never takes
a folder between its creation and its lock (seen in `make demo`: the planner's new folder swept away by
the join starting beside it, FileNotFoundError at start)."""
import os
import tempfile

from streams.adapters import faust as app


def test_a_sweep_right_after_the_folder_is_made_leaves_it(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real_mkdtemp = tempfile.mkdtemp
    swept = []

    def mkdtemp(*args, **kwargs):  # another worker's sweep lands between creation and lock
        made = real_mkdtemp(*args, **kwargs)
        swept.extend(app.remove_stale_data_dirs(str(tmp_path)))
        return made

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    folder = app.data_dir("planner")
    assert os.path.isdir(folder) and not swept
    assert os.path.basename(folder).startswith("imagefork-planner-")
    assert app.remove_stale_data_dirs(str(tmp_path)) == []  # locked: a live process's folder stays
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(folder)]  # nothing hidden left behind
