"""Sample sources: two datasets share an image exactly when they read the same file (or scene)."""

from pathlib import Path

from trustseg.data.identity import sample_sources, shared_sources
from trustseg.data.spec import load_dataset


def test_slices_of_one_folder_share_exactly_their_common_images(folder_root):
    whole = load_dataset(f"folder:{folder_root}")
    first, rest = load_dataset(f"folder:{folder_root}#images=0:2"), load_dataset(f"folder:{folder_root}#images=1:")
    assert sample_sources(whole) == [str(Path(whole[i]["path"]).resolve()) for i in range(len(whole))]
    assert shared_sources(first, rest) == [sample_sources(whole)[1]]
    assert shared_sources(first, load_dataset(f"folder:{folder_root}#images=2:")) == []


def test_a_linked_or_relative_copy_is_the_same_image(folder_root, tmp_path, monkeypatch):
    linked = tmp_path / "linked"
    (linked / "images").mkdir(parents=True)
    (linked / "masks").symlink_to(folder_root / "masks")
    for image in (folder_root / "images").iterdir():
        (linked / "images" / image.name).symlink_to(image)
    monkeypatch.chdir(folder_root.parent)
    original = load_dataset(f"folder:{folder_root.name}")  # relative path
    assert shared_sources(load_dataset(f"folder:{linked}"), original) == sample_sources(original)


def test_synthetic_scenes_are_the_same_when_seed_split_and_index_are():
    val = load_dataset("synthetic#split=val,num_images=4,size=32")
    assert shared_sources(load_dataset("synthetic#split=val,num_images=2,size=48"), val) == sample_sources(val)[:2]
    assert shared_sources(load_dataset("synthetic#split=val,num_images=4,size=32,seed=1"), val) == []
    assert shared_sources(load_dataset("synthetic#split=test,num_images=4,size=32"), val) == []
    assert shared_sources(load_dataset("synthetic#split=val,num_images=4,size=32,images=2:"), val) == \
        sample_sources(val)[2:]
