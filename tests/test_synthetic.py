import numpy as np
import pytest
import torch

from model.io import to_model
from model.run_config import DataConfig, load_config
from radiomaps import SyntheticRadioMaps, build_dataset, build_loader
from radiomaps.__main__ import main as data_cli
from radiomaps.synthetic import (Propagation, city, path_gain, path_gain_db, sample,
                                  wall_crossings)

PROP = Propagation()


def _open_city(size=128):
    return np.zeros((size, size), dtype=bool)


def test_same_seed_same_maps_other_seed_other_maps():
    a, b = sample(3, 5, 1), sample(3, 5, 1)
    for key in ("image", "buildings", "tx"):
        assert np.array_equal(a[key], b[key])
    assert not np.array_equal(city(3, 5), city(4, 5))
    assert not np.array_equal(city(3, 5), city(3, 6))
    assert not np.array_equal(sample(3, 5, 1)["tx"], sample(3, 5, 2)["tx"])


def test_maps_look_like_radiomapseer_pngs():
    for map_id in (1, 2, 3):
        item = sample(0, map_id, 0)
        gain, buildings, tx = item["image"], item["buildings"].astype(bool), item["tx"]
        assert gain.shape == buildings.shape == tx.shape == (256, 256)
        assert gain.dtype == np.float32 and 0.0 <= gain.min() and gain.max() <= 1.0
        assert np.array_equal(np.round(gain * 255) / 255, gain)  # 8-bit levels, as stored
        assert np.all(gain[buildings] == 0.0)  # zero inside buildings
        assert 0.1 < buildings.mean() < 0.7  # a city, not a field or a block of concrete
        assert tx.sum() == 1.0 and not buildings[tx.astype(bool)].any()  # tx in a street
        ty, tx_col = np.unravel_index(tx.argmax(), tx.shape)
        assert gain[ty, tx_col] == gain.max() > 0.9  # brightest at the transmitter
        assert (gain[~buildings] > 0).mean() > 0.3  # most of the street has signal


def test_gain_falls_with_distance_in_line_of_sight():
    buildings = _open_city()
    tx = (64, 64)
    gain_db = path_gain_db(buildings, tx)
    row = gain_db[64, 65:]  # a straight line of sight away from the transmitter
    assert np.all(np.diff(row) < 0)
    # free space at 5.9 GHz: -47.9 dB at 1 m, 20 dB per decade before the breakpoint
    assert gain_db[64, 65] == pytest.approx(-47.86, abs=0.05)
    assert gain_db[64, 74] - gain_db[64, 65] == pytest.approx(-20.0, abs=0.05)
    scaled = path_gain(buildings, tx)
    dist = np.hypot(*np.mgrid[0:128, 0:128] - np.array(tx)[:, None, None])
    order = np.argsort(dist, axis=None)
    assert np.all(np.diff(scaled.ravel()[order]) <= 1e-6)  # everywhere, not just one row


def test_gain_is_lower_behind_a_building_than_in_line_of_sight_at_equal_distance():
    buildings = _open_city()
    buildings[40:88, 80:100] = True  # one building east of the transmitter
    tx = (64, 64)
    walls = wall_crossings(buildings, tx)
    assert walls[64, 70] == 0 and walls[64, 90] == 1 and walls[64, 110] == 2
    gain_db = path_gain_db(buildings, tx)
    behind, open_side = gain_db[64, 110], gain_db[64, 18]  # both 46 px from the transmitter
    assert behind <= open_side - 2 * PROP.wall_loss_db + 0.01  # two walls' loss
    scaled = path_gain(buildings, tx)
    assert scaled[64, 110] < scaled[64, 18]
    assert np.all(scaled[buildings] == 0)


def test_synthetic_dataset_items_follow_the_contract():
    cfg = DataConfig(name="synthetic", num_maps=8, num_tx=2, image_size=[64, 48])
    train, val, test = (build_dataset(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (12, 2, 2)  # 6 / 1 / 1 maps, split by map
    assert not set(train.map_ids) & set(val.map_ids) | set(test.map_ids) & set(train.map_ids)
    item = train[3]
    assert item["name"] == f"{train.map_ids[1]}_1"
    for key in ("image", "buildings", "tx"):
        assert item[key].shape == (1, 64, 48) and item[key].dtype == torch.float32
        assert -1.0 <= item[key].min() and item[key].max() <= 1.0
    assert train.cached and torch.equal(train[3]["image"], item["image"])
    uncached = SyntheticRadioMaps(train.map_ids, 2, [64, 48], seed=cfg.seed, cache_bytes=0)
    assert not uncached.cached  # too big to keep: regenerated on each access, same values
    assert torch.equal(uncached[3]["image"], item["image"])
    native = build_dataset(DataConfig(name="synthetic", num_maps=8, num_tx=2,
                                      image_size="native"), "train")[3]
    expected = sample(cfg.seed, train.map_ids[1], 1)["image"]
    assert torch.equal(native["image"][0], to_model(expected))


def test_the_uint8_cache_returns_exactly_the_generated_maps():
    maps = SyntheticRadioMaps([3, 4], 2, "native", seed=5)
    fresh = SyntheticRadioMaps([3, 4], 2, "native", seed=5, cache_bytes=0)
    first = [maps[i] for i in range(len(maps))]  # generated, then kept as gray levels
    assert maps.cached and len(maps._levels) == 4 and not fresh.cached
    for i in range(len(maps)):
        again, generated = maps[i], fresh[i]
        for key in ("image", "buildings", "tx"):
            assert torch.equal(again[key], generated[key])
            assert torch.equal(first[i][key], again[key])


def test_cache_on_disk_reads_back_through_the_radiomapseer_reader(tmp_path, capsys):
    data_cli(["synth", "--out", str(tmp_path), "--maps", "8", "--tx", "2"])
    assert "ms per radio map" in capsys.readouterr().out
    assert (tmp_path / "png/buildings_complete/8.png").is_file()
    assert (tmp_path / "gain/DPM/8_1.png").is_file()
    kw = dict(num_maps=8, num_tx=2, image_size=[64, 64])
    on_disk = build_dataset(DataConfig(name="radio", root=str(tmp_path), **kw), "val")
    in_memory = build_dataset(DataConfig(name="synthetic", **kw), "val")
    assert on_disk.map_ids == in_memory.map_ids
    for i in range(len(on_disk)):
        a, b = on_disk[i], in_memory[i]
        assert a["name"] == b["name"]
        for key in ("image", "buildings", "tx"):
            assert torch.allclose(a[key], b[key], atol=1e-6)


def test_quickstart_config_feeds_batches_through_worker_processes():
    cfg = load_config("configs/quickstart.yaml")
    cfg.data.num_maps = 8  # the quickstart's 48 maps, cut down for test time
    ds = build_dataset(cfg.data, "train")
    loader = build_loader(ds, batch_size=4, seed=1, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(ds) // 4
    assert batches[0]["image"].shape == (4, 1, 64, 64)
    names = [n for b in batches for n in b["name"]]
    assert len(set(names)) == len(names)
