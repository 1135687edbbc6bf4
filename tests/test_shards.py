import os

import pytest

from fiqa.data.shards import ShardSpecError, expand_shard_spec

from conftest import labeled_members, write_tar


@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(3):
        write_tar(d / f"faces-{i:06d}.tar", labeled_members(2))
    (d / "notes.txt").write_text("not a shard")
    return d


def test_single_path_dir_glob_brace_and_list(shard_dir):
    all3 = sorted(str(p) for p in shard_dir.glob("*.tar"))
    assert expand_shard_spec(str(shard_dir / "faces-000001.tar")) == [all3[1]]
    assert expand_shard_spec(str(shard_dir)) == all3
    assert expand_shard_spec(str(shard_dir / "*.tar")) == all3
    assert expand_shard_spec(str(shard_dir / "faces-{000000..000002}.tar")) == all3
    assert expand_shard_spec([all3[2], all3[0], all3[0]]) == [all3[0], all3[2]]


def test_missing_and_empty_specs_fail_loudly(shard_dir, tmp_path):
    with pytest.raises(ShardSpecError, match="does not exist"):
        expand_shard_spec(str(shard_dir / "faces-{000000..000005}.tar"))
    with pytest.raises(ShardSpecError, match="matches no"):
        expand_shard_spec(str(shard_dir / "*.zip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSpecError, match="matches no"):
        expand_shard_spec(str(tmp_path / "empty"))
    with pytest.raises(ShardSpecError, match="empty"):
        expand_shard_spec("")
    with pytest.raises(ShardSpecError):
        expand_shard_spec([])


def test_a_missing_spec_names_its_key_and_where_a_relative_one_was_looked_for(
    shard_dir, tmp_path, monkeypatch
):
    """The config's data.* paths resolve from where `fiqa` runs, not from the config's folder."""
    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    with pytest.raises(ShardSpecError) as e:
        expand_shard_spec("data/demo/labeled_train", what="data.labeled_train")
    assert str(e.value) == (
        "data.labeled_train: shard 'data/demo/labeled_train' does not exist (looked for "
        f"{cwd}/data/demo/labeled_train: a relative path resolves from the working directory)"
    )
    with pytest.raises(ShardSpecError) as e:
        expand_shard_spec(["shards/*.tar", "data/*.tar"], what="data.test")
    assert str(e.value) == (
        "data.test: 'data/*.tar' matches no .tar shard (looked for "
        f"{cwd}/data/*.tar: a relative path resolves from the working directory)"
    )
    absent = str(tmp_path / "absent")
    with pytest.raises(ShardSpecError) as e:
        expand_shard_spec(absent)
    assert str(e.value) == f"shard {absent!r} does not exist"  # absolute: nothing to add
    assert len(expand_shard_spec("shards", what="data.test")) == 3
