"""`januspipe calibrate` files: cost models timed on one device, used by the simulation elsewhere."""
import json
import logging

import pytest

import janus_compile.bench as bench
from janus_compile.bench import BenchConfig, run_simulation
from janus_compile.device_costs import CalibrateConfig, calibrate_models, check_costs_cover, load_device_costs, markdown

TINY = dict(hidden=8, layers=2, large=None, atoms=8, repeats=1)


@pytest.fixture(scope="module")
def cost_file(tmp_path_factory):
    result = calibrate_models(CalibrateConfig(models=["schnet"], device="cpu", whole_graph_repeats=2, **TINY), progress=False)
    path = tmp_path_factory.mktemp("costs") / "costs.json"
    path.write_text(json.dumps(result))
    return path, result


def test_calibrate_writes_a_cost_model_per_model_with_its_whole_graph_time(cost_file):
    path, result = cost_file
    entry = result["models"]["schnet"]
    assert entry["nodes"] > 100 and entry["whole_graph_s"] > 0 and entry["sum_of_nodes_s"] > 0
    assert result["micro_batch"]["atoms"] == 16 and result["micro_batch"]["edges"] > 0  # 2 structures of 8
    costs = load_device_costs(str(path))
    cm = costs["models"]["schnet"]
    assert cm.device == "cpu" and cm.coeffs == {k: tuple(v) for k, v in entry["cost_model"]["coeffs"].items()}
    assert costs["scales"]["schnet"] == pytest.approx(entry["whole_graph_s"] / entry["sum_of_nodes_s"], rel=1e-12)
    assert "| schnet | 2 |" in markdown(result)


def test_simulation_prices_nodes_with_the_file_scaled_and_calibrates_nothing(cost_file, monkeypatch):
    path, result = cost_file
    data = json.loads(path.read_text())
    # a device twice as slow per node, whose graphs run whole in 0.25 of the summed node times
    cm = data["models"]["schnet"]["cost_model"]
    cm["coeffs"] = {k: [2 * x for x in v] for k, v in cm["coeffs"].items()}
    cm["launch"] = {k: 2 * v for k, v in cm["launch"].items()}
    data["models"]["schnet"]["whole_graph_s"] = 0.25 * data["models"]["schnet"]["sum_of_nodes_s"]
    slow = path.with_name("slow.json")
    slow.write_text(json.dumps(data))

    def no_calibration(*a, **k):
        raise AssertionError("the simulation calibrated although it was given costs")

    monkeypatch.setattr("janus_compile.passes.cost.calibrate", no_calibration)
    cfg = BenchConfig(
        hidden=8, layers=2, atoms=8, real=False, simulate=True, sim_models=["schnet"], sim_stages=[2], sim_factors=[1],
        sim_ilp_time_s=1.0, equal_memory=False, count_cap=False,
    )
    base = load_device_costs(str(path))
    mbs = bench.sim_microbatches(cfg)
    plain = bench._prepare_sim_model(cfg, "schnet", 2, mbs, base["models"]["schnet"], 1.0)
    scaled = bench._prepare_sim_model(cfg, "schnet", 2, mbs, load_device_costs(str(slow))["models"]["schnet"], 0.25)
    assert plain.node_times.keys() == scaled.node_times.keys()
    for name, t in plain.node_times.items():
        assert scaled.node_times[name] == pytest.approx(0.5 * t, rel=1e-9, abs=1e-15)

    cfg.sim_costs = str(slow)
    sim = run_simulation(cfg, progress=False)
    assert sim["costs"]["device"] == "cpu" and sim["costs"]["file"] == str(slow)
    assert sim["costs"]["scales"]["schnet"] == pytest.approx(0.25)
    (row,) = sim["rows"]
    assert all(r["makespan_s"] > 0 for r in row["schedules"].values())
    assert "costs calibrated on cpu" in bench.report({"config": vars(cfg), "machine": {"cpus": 2, "torch": "x", "backend": "gloo"}, "simulated": sim, "wall_s": 1.0})


def test_bad_cost_files_and_missing_models_name_the_fix(cost_file, tmp_path, caplog):
    path, result = cost_file
    with pytest.raises(ValueError, match="januspipe calibrate"):
        load_device_costs(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        load_device_costs(str(tmp_path / "bad.json"))
    (tmp_path / "old.json").write_text(json.dumps({"version": 99, "models": {}}))
    with pytest.raises(ValueError, match="not a cost file"):
        load_device_costs(str(tmp_path / "old.json"))
    costs = load_device_costs(str(path))
    with pytest.raises(ValueError, match=r"not for \['painn'\]"):
        check_costs_cover(costs, ["schnet", "painn"], result["micro_batch"], str(path))
    with caplog.at_level(logging.WARNING):
        check_costs_cover(costs, ["schnet"], {"atoms": 1008, "edges": 39956}, str(path), "float64")
    assert "extrapolates" in caplog.text and "timed in float32" in caplog.text


def test_calibrate_command_writes_a_file_bench_sim_costs_reads(tmp_path, capsys):
    from janus_compile.bench import config_from_args
    from janus_compile.cli import build_parser, main

    out = tmp_path / "cpu_costs.json"
    argv = ["calibrate", "--models", "schnet", "--hidden", "8", "--layers", "1", "--large", "0", "--atoms", "8"]
    assert main(argv + ["--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert "| schnet | 1 |" in capsys.readouterr().out
    assert set(load_device_costs(str(out))["models"]) == {"schnet"}
    args = build_parser().parse_args(["bench", "--no-real", "--simulate", "--sim-costs", str(out)])
    assert config_from_args(args).sim_costs == str(out)
