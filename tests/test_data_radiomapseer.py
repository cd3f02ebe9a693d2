import shutil
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from model.config import ConfigError
from model.io import read_png, to_model
from model.run_config import DataConfig
from radiomaps import DataError, build_dataset, build_loader, validation_subset
from radiomaps.splits import spanning_subset, split_map_ids

NUM_MAPS, NUM_TX = 10, 3  # maps 0..10 on disk (map 0 is never read, as upstream)
SIMULATIONS = ("DPM", "IRT2", "IRT4", "carsDPM", "carsIRT2", "carsIRT4")


def _png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A RadioMapSeer-shaped folder: every map's files in every simulation folder."""
    root = tmp_path_factory.mktemp("RadioMapSeer")
    rng = np.random.default_rng(0)
    for m in range(NUM_MAPS + 1):
        _png(root / f"png/buildings_complete/{m}.png", (rng.random((256, 256)) < 0.3) * 255)
        _png(root / f"png/cars/{m}.png", (rng.random((256, 256)) < 0.02) * 255)
        for t in range(NUM_TX):
            antenna = np.zeros((256, 256))
            antenna[rng.integers(256), rng.integers(256)] = 255
            _png(root / f"png/antennas/{m}_{t}.png", antenna)
            for sim in SIMULATIONS:
                if sim.endswith("IRT4") and t >= 2:
                    continue  # IRT4 has 2 transmitters per map
                _png(root / f"gain/{sim}/{m}_{t}.png", rng.integers(0, 256, (256, 256)))
    return root


def _cfg(root, **kw):
    kw = {"num_maps": NUM_MAPS, "num_tx": NUM_TX, "image_size": "native", **kw}
    return DataConfig(name="radio", root=str(root), **kw)


def test_items_are_the_files_scaled_to_minus_one_one(tree):
    ds = build_dataset(_cfg(tree), "train")
    item = ds[4]  # transmitter 1 of the split's second map
    map_id = ds.map_ids[1]
    assert item["name"] == f"{map_id}_1"
    expected = {"image": f"gain/DPM/{map_id}_1.png", "tx": f"png/antennas/{map_id}_1.png",
                "buildings": f"png/buildings_complete/{map_id}.png"}
    for key, rel in expected.items():
        assert item[key].shape == (1, 256, 256) and item[key].dtype == torch.float32
        assert torch.equal(item[key][0], to_model(read_png(tree / rel)))
    gain = item["image"]
    assert gain.min() >= -1 and gain.max() <= 1
    pixels = np.asarray(Image.open(tree / expected["image"]), dtype=np.float32)
    assert torch.equal(gain[0], (torch.from_numpy(pixels) / 255 - 0.5) / 0.5)  # pixel / 255


@pytest.mark.parametrize("simulation, cars, folder", [
    ("IRT2", False, "IRT2"), ("IRT4", False, "IRT4"), ("DPM", True, "carsDPM"),
    ("IRT4", True, "carsIRT4")])
def test_simulation_and_cars_pick_their_folder(tree, simulation, cars, folder):
    ds = build_dataset(_cfg(tree, simulation=simulation, cars=cars, num_tx=2), "test")
    item = ds[1]
    map_id = ds.map_ids[0]
    assert torch.equal(item["image"][0], to_model(read_png(tree / f"gain/{folder}/{map_id}_1.png")))
    assert ("cars" in item) == cars
    if cars:
        assert torch.equal(item["cars"][0], to_model(read_png(tree / f"png/cars/{map_id}.png")))


def test_irt4_has_two_transmitters(tree):
    with pytest.raises(ConfigError, match=r"num_tx=3: IRT4 has 2 transmitters"):
        build_dataset(_cfg(tree, simulation="IRT4"), "train")


def test_disjoint_split_is_disjoint_complete_and_deterministic(tree):
    sets = {s: build_dataset(_cfg(tree), s).map_ids for s in ("train", "val", "test")}
    assert [len(sets[s]) for s in ("train", "val", "test")] == [7, 2, 1]
    assert len(build_dataset(_cfg(tree), "val")) == 2 * NUM_TX
    assert sorted(sets["train"] + sets["val"] + sets["test"]) == list(range(1, NUM_MAPS + 1))
    assert sets == {s: build_dataset(_cfg(tree), s).map_ids for s in ("train", "val", "test")}


def test_full_dataset_splits_match_upstream_definitions():
    order = np.arange(0, 700, 1, dtype=np.int16)  # upstream RadioUNet_c, verbatim procedure
    np.random.seed(42)
    np.random.shuffle(order)
    files = order.astype(int) + 1
    up = {s: split_map_ids(s, "upstream") for s in ("train", "val", "test")}
    assert up["train"] == files[0:601].tolist()  # positions 0..600 inclusive
    assert up["val"] == files[501:601].tolist()
    assert up["test"] == files[600:700].tolist()
    assert len(set(up["train"]) & set(up["val"])) == 100  # upstream's overlap, reproduced
    assert set(up["train"]) & set(up["test"]) == {int(files[600])}
    ours = {s: split_map_ids(s, "disjoint") for s in ("train", "val", "test")}
    assert [len(ours[s]) for s in ("train", "val", "test")] == [501, 99, 100]
    assert ours["train"] == files[:501].tolist() and ours["test"] == up["test"]
    assert len(set().union(*ours.values())) == 700 and 0 not in set().union(*ours.values())


def test_too_few_maps_for_three_splits_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.num_maps=5: the 'val' split would be empty"):
        split_map_ids("val", "disjoint", num_maps=5)
    assert len(split_map_ids("val", "disjoint", num_maps=6)) == 1


@pytest.mark.parametrize("size, shape", [([64, 48], (64, 48)), (32, (32, 32)),
                                         ("native", (256, 256))])
def test_resize_shape_and_range(tree, size, shape):
    item = build_dataset(_cfg(tree, image_size=size), "val")[0]
    for key in ("image", "buildings", "tx"):
        assert item[key].shape == (1, *shape)
        assert -1.0 <= item[key].min() and item[key].max() <= 1.0


def test_missing_file_is_named_with_the_expected_layout(tree, tmp_path):
    root = tmp_path / "RadioMapSeer"
    shutil.copytree(tree, root)
    cfg = _cfg(root)
    victim = build_dataset(cfg, "test").map_ids[0]
    (root / f"gain/DPM/{victim}_2.png").unlink()
    with pytest.raises(DataError, match=rf"gain/DPM/{victim}_2\.png: file not found.*"
                                        r"expected the RadioMapSeer layout"):
        build_dataset(cfg, "test")
    build_dataset(cfg, "train")  # other splits do not need that map
    with pytest.raises(DataError, match=r"png/antennas: folder not found"):
        shutil.rmtree(root / "png/antennas")
        build_dataset(cfg, "train")
    with pytest.raises(DataError, match=r"nowhere: RadioMapSeer folder not found"):
        build_dataset(_cfg(tmp_path / "nowhere"), "train")


def test_corrupt_png_is_named_when_read(tree, tmp_path):
    root = tmp_path / "RadioMapSeer"
    shutil.copytree(tree, root)
    ds = build_dataset(_cfg(root), "val")
    bad = root / f"png/buildings_complete/{ds.map_ids[0]}.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=rf"{bad.name}: not a decodable PNG.*RadioMapSeer layout"):
        ds[0]


def test_hflip_only_in_training_and_consistent_across_channels(tree):
    train = build_dataset(_cfg(tree, hflip=True, image_size=64), "train")
    ref = build_dataset(_cfg(tree, image_size=64), "train")[0]
    flips = []
    for epoch in range(12):
        train.set_epoch(epoch)
        item = train[0]
        flipped = torch.equal(item["image"], ref["image"].flip(-1))
        assert flipped or torch.equal(item["image"], ref["image"])
        for key in ("buildings", "tx"):
            assert torch.equal(item[key], ref[key].flip(-1) if flipped else ref[key])
        assert torch.equal(train[0]["image"], item["image"])  # fixed within an epoch
        flips.append(flipped)
    assert set(flips) == {True, False}
    val = build_dataset(_cfg(tree, hflip=True, image_size=64), "val")
    assert torch.equal(val[0]["image"], build_dataset(_cfg(tree, image_size=64), "val")[0]["image"])


def test_flips_do_not_depend_on_workers_or_on_resuming(tree):
    ds = build_dataset(_cfg(tree, hflip=True, image_size=16), "train")

    def two_epochs(num_workers, start=0):
        loader = build_loader(ds, batch_size=7, seed=5, num_workers=num_workers)
        loader.sampler.set_epoch(start)
        return [torch.cat([b["image"] for b in loader]) for _ in range(2 - start)]

    serial = two_epochs(0)
    assert all(torch.equal(a, b) for a, b in zip(serial, two_epochs(2)))
    assert torch.equal(two_epochs(0, start=1)[0], serial[1])  # resumed at epoch 1


def test_crops_are_windows_of_the_whole_map_in_training_only(tree):
    train = build_dataset(_cfg(tree, crop_size=[40, 24]), "train")
    whole = build_dataset(_cfg(tree), "train")
    origins = set()
    for epoch in range(6):
        train.set_epoch(epoch)
        item, ref = train[1], whole[1]
        assert item["image"].shape == (1, 40, 24)
        top, left = train.crop_origin(1, 256, 256)
        origins.add((top, left))
        for key in ("image", "buildings", "tx"):  # one window for every channel
            assert torch.equal(item[key], ref[key][:, top:top + 40, left:left + 24])
        assert torch.equal(train[1]["image"], item["image"])  # fixed within an epoch
    assert len(origins) == 6  # a new window each epoch
    for split in ("val", "test"):  # judged on whole maps
        assert build_dataset(_cfg(tree, crop_size=[40, 24]), split)[0]["image"].shape == (1, 256, 256)
    with pytest.raises(ConfigError, match="crop_size"):
        _cfg(tree, crop_size=[300, 24], image_size=[256, 256]).validate("data")


def test_crops_do_not_depend_on_workers_or_on_resuming(tree):
    ds = build_dataset(_cfg(tree, crop_size=[16, 16], hflip=True), "train")

    def two_epochs(num_workers, start=0):
        loader = build_loader(ds, batch_size=7, seed=5, num_workers=num_workers)
        loader.sampler.set_epoch(start)
        return [torch.cat([b["image"] for b in loader]) for _ in range(2 - start)]

    serial = two_epochs(0)
    assert not torch.equal(serial[0], serial[1])
    assert all(torch.equal(a, b) for a, b in zip(serial, two_epochs(2)))
    assert torch.equal(two_epochs(0, start=1)[0], serial[1])  # resumed at epoch 1


def test_validation_subset_spans_every_map_before_repeating(tree):
    val = build_dataset(_cfg(tree, num_maps=10), "val")  # few maps: repeats are needed
    maps = len(val.map_ids)
    subset = validation_subset(val, maps + 1, seed=3)
    names = [subset[i]["name"] for i in range(len(subset))]
    first_round = {n.split("_")[0] for n in names[:maps]}
    assert len(first_round) == maps  # every val map once before any repeats
    assert len(set(names)) == len(names)  # a repeat takes another transmitter
    again = validation_subset(build_dataset(_cfg(tree, num_maps=10), "val"), maps + 1, seed=3)
    assert [again[i]["name"] for i in range(len(again))] == names  # the same at every checkpoint


def test_validation_subset_of_many_maps_has_as_many_distinct_maps_as_items():
    indices = spanning_subset(list(range(100, 180)), num_tx=80, size=64, seed=42)
    assert len({i // 80 for i in indices}) == 64
    assert len(spanning_subset(list(range(5)), num_tx=2, size=64)) == 10  # capped at the split


def _names(loader):
    return [n for batch in loader for n in batch["name"]]


def test_loader_shuffles_deterministically_per_epoch(tree):
    ds = build_dataset(_cfg(tree, image_size=32), "train")  # 21 items
    a = build_loader(ds, batch_size=4, seed=7, num_workers=0)
    b = build_loader(ds, batch_size=4, seed=7, num_workers=2)
    first, second = _names(a), _names(a)
    assert len(first) == 20 and len(set(first)) == 20  # drop_last: 5 full batches
    assert first != second  # a new order each epoch without any set_epoch call
    assert _names(b) == first and _names(b) == second  # same seed: same orders, with workers
    a.sampler.set_epoch(0)
    assert _names(a) == first  # resuming at epoch 0 replays it
    assert _names(build_loader(ds, batch_size=4, seed=8, num_workers=0)) != first
    ordered = build_loader(ds, batch_size=5, shuffle=False, num_workers=0, drop_last=False)
    assert _names(ordered) == [f"{m}_{t}" for m in ds.map_ids for t in range(NUM_TX)]
    batch = next(iter(a))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["tx"].shape == (4, 1, 32, 32)
    with pytest.raises(ConfigError, match="cannot fill one batch of 64"):
        build_loader(ds, batch_size=64)


def _rank_names(rank, world, root, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    ds = build_dataset(_cfg(root, image_size=16), "train")
    out[rank] = _names(build_loader(ds, batch_size=2, seed=3, num_workers=0))
    dist.destroy_process_group()


def test_loader_shards_across_ranks_when_distributed(tree):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(_rank_names, args=(2, str(tree), port, out), nprocs=2,
                       start_method="fork")  # fork: no re-import of torch per rank
    rank0, rank1 = out[0], out[1]
    assert len(rank0) == len(rank1) == 10  # 21 items: 10 per rank, 5 batches of 2
    assert not set(rank0) & set(rank1)
