"""``rocmux bench``: measurement on the tiny model, JSON, table, comparison, plot, sweep
and errors."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rocmux import benchmark
from rocmux.benchmark import BenchSettings, BenchUsageError, Sweep, fill_load, plan_jobs
from rocmux.benchmark_report import compare, load_document, markdown_table, peak_memory
from rocmux.cli import main
from rocmux.types import LoadConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["bench", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- measuring a real runtime ------------------------------------------------------------------


@pytest.mark.llama_server
def test_bench_llamacpp_on_the_tiny_model(tiny_model, llama_server, tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = _bench(
        capsys,
        str(tiny_model),
        "-b",
        "llamacpp_hip",
        "-c",
        "1,2",
        "-p",
        "32",
        "-n",
        "8",
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
    )
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == benchmark.SCHEMA
    assert doc["settings"]["concurrency"] == [1, 2]
    assert doc["command"][:2] == ["rocmux", "bench"]
    env = doc["environment"]
    assert env["rocmux"] == "0.1.0" and "rocmux-llamacpp-hip" in env["distributions"]
    assert env["cpu_count"] >= 1 and "kernel" in env["drivers"]

    (run,) = doc["runs"]
    assert run["error"] is None
    assert run["model"]["sha256"] == hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    assert run["model"]["architecture"] == "llama"
    backend = run["backend"]
    assert backend["name"] == "llamacpp_hip" and backend["version"]
    # Every slot and its tokens fit: parallel = top concurrency, context = 2 slots x 256.
    assert run["load_config"]["parallel"] == 2 and run["load_config"]["context_len"] == 512
    runtime = run["runtime"]
    assert "--parallel 2" in runtime["command"] and "--ctx-size 512" in runtime["command"]
    assert len(runtime["executable_sha256"]) == 64 and runtime["executable_version"]
    # The prompt is sized from the runtime's own counts: 32 tokens, BOS included.
    assert run["prompt"]["one_token_words"] is True
    assert run["prompt"]["words"] + run["prompt"]["special_tokens"] == 32

    levels = {level["concurrency"]: level for level in run["levels"]}
    assert sorted(levels) == [1, 2]
    for c, level in levels.items():
        assert level["streams"] == c and level["errors"] == 0 and level["short_streams"] == 0
        assert level["completion_tokens"] == 8 * c
        assert level["prompt_tokens_seen"] == [32]
        assert level["ttft_ms_median"] > 0 and level["prefill_tps"] > 0
        assert level["decode_tps_median"] > 0 and level["aggregate_tps"] > 0
        assert len(level["stream_results"]) == c
        assert all(s["finish_reason"] == "length" for s in level["stream_results"])
        # llama-server is a child process: its memory is counted.
        assert level["rss_peak"] > run["memory"]["rss_baseline"]
        assert level["other_cpu_cores"] >= 0
    # At concurrency 1, prefill is the prompt over the TTFT.
    one = levels[1]
    assert one["prefill_tps"] == pytest.approx(32 / (one["ttft_ms_median"] / 1000), rel=0.01)

    assert "llamacpp_hip" in out and "tiny.gguf" in out
    assert "c=1, TTFT" in err and "c=2, TTFT" in err  # progress lines (stderr is no TTY)
    assert out_png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.llama_server
@pytest.mark.anyio
async def test_ignore_eos_reaches_llama_server(default_model, llama_server):
    from contextlib import aclosing

    from rocmux.types import GenerateConfig, Message
    from rocmux_llamacpp_hip.backend import LlamaCppBackend

    question = [Message("user", "What is the capital of France? One word.")]
    async with await LlamaCppBackend().load(default_model, LoadConfig(context_len=512)) as model:
        counts = []
        for ignore in (False, True):
            config = GenerateConfig(max_tokens=24, temperature=0.0, seed=0, ignore_eos=ignore)
            async with aclosing(model.chat(question, config)) as tokens:
                usage = [t.usage async for t in tokens if t.usage is not None]
            counts.append(usage[-1].completion_tokens)
    assert counts[0] < 24 and counts[1] == 24


@pytest.mark.llama_server
def test_sweep_loads_once_per_value(tiny_model, llama_server, tmp_path, capsys):
    out_json = tmp_path / "sweep.json"
    code, out, err = _bench(
        capsys,
        str(tiny_model),
        "-b",
        "llamacpp_hip",
        "-c",
        "1",
        "-p",
        "16",
        "-n",
        "4",
        "--sweep",
        "flash_attn=on,off",
        "--no-hash",
        "--json",
        str(out_json),
    )
    assert code == 0, err
    runs = json.loads(out_json.read_text())["runs"]
    assert [r["setting"] for r in runs] == ["flash_attn=on", "flash_attn=off"]
    assert [r["load_config"]["flash_attn"] for r in runs] == [True, False]
    assert "--flash-attn on" in runs[0]["runtime"]["command"]
    assert "--flash-attn off" in runs[1]["runtime"]["command"]
    assert all(len(r["levels"]) == 1 and r["levels"][0]["errors"] == 0 for r in runs)
    assert runs[0]["model"]["sha256"] is None
    assert "flash_attn=on" in out and "flash_attn=off" in out


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_bench_hip_direct_in_process(tiny_model, tmp_path, capsys):
    out_json = tmp_path / "hd.json"
    code, _, err = _bench(
        capsys,
        str(tiny_model),
        "-b",
        "hip_direct",
        "-c",
        "1,2",
        "-p",
        "24",
        "-n",
        "6",
        "--no-hash",
        "--json",
        str(out_json),
    )
    assert code == 0, err
    (run,) = json.loads(out_json.read_text())["runs"]
    assert run["error"] is None
    assert run["runtime"]["device"] == "cpu" and run["runtime"]["torch"]
    assert "command" not in run["runtime"]  # no server process
    assert run["load_config"]["context_len"] == 256  # per sequence for hip_direct
    for level in run["levels"]:
        assert level["completion_tokens"] == 6 * level["concurrency"]
        assert level["prompt_tokens_seen"] == [24]


# -- errors ------------------------------------------------------------------------------------


def test_missing_model_fails_before_anything_runs(tmp_path, capsys):
    code, out, err = _bench(capsys, str(tmp_path / "nope.gguf"), "-b", "llamacpp_hip")
    assert code == 1
    assert "nope.gguf does not exist" in err and out == ""


def test_unknown_backend_is_named(tiny_model, capsys):
    code, _, err = _bench(capsys, str(tiny_model), "-b", "llamacpp_hip,warp_drive")
    assert code == 1
    assert "no backend named 'warp_drive'" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-c", "1,x"], "--concurrency takes integers"),
        (["-c", "0,4"], "--concurrency takes positive integers"),
        (["--sweep", "warp=1,2"], "LoadConfig has no field 'warp'"),
        (["--sweep", "flash_attn=maybe"], "flash_attn takes on/off"),
        (["--sweep", "flash_attn"], "--sweep takes FIELD=V1,V2"),
        (["-p", "4"], "--prompt-tokens must be at least 8"),
    ],
)
def test_malformed_options_exit_2(tiny_model, capsys, args, message):
    code, _, err = _bench(capsys, str(tiny_model), "-b", "llamacpp_hip", *args)
    assert code == 2
    assert message in err


def test_exit_status_through_the_command_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "rocmux.cli", "bench", "-c", "one"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "rocmux bench: error: --concurrency" in done.stderr


def test_compare_with_a_file_that_is_not_a_result(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    new = tmp_path / "new.json"
    new.write_text(json.dumps(_doc()))
    code, _, err = _bench(capsys, "--from-json", str(new), "--compare", str(other))
    assert code == 1
    assert "other.json is not a rocmux bench result" in err


# -- reports from saved documents -------------------------------------------------------------


def _level(c: int, aggregate: float, ttft: float, decode: float, rss: int) -> dict:
    return {
        "concurrency": c,
        "rounds": 1,
        "streams": c,
        "errors": 0,
        "short_streams": 0,
        "prompt_tokens_seen": [64],
        "completion_tokens": 16 * c,
        "wall_s": 1.0,
        "ttft_ms_median": ttft,
        "ttft_ms_p90": ttft * 1.2,
        "prefill_tps": 64 / ttft * 1000,
        "decode_tps_median": decode,
        "decode_tps_p10": decode,
        "decode_tps_p90": decode,
        "aggregate_tps": aggregate,
        "rss_peak": rss,
        "gpu_peak": None,
        "stream_results": [],
    }


def _run(backend: str, levels: list[dict], setting: str = "") -> dict:
    return {
        "model": {"file": "m.gguf", "path": "/m/m.gguf", "sha256": "0" * 64},
        "backend": {"name": backend, "version": "1"},
        "setting": setting,
        "load_config": {},
        "memory": {"rss_baseline": 100 << 20, "gpu_baseline": None},
        "runtime": {},
        "levels": levels,
        "error": None,
    }


def _doc(gen_tokens: int = 16, scale: float = 1.0) -> dict:
    return {
        "schema": benchmark.SCHEMA,
        "created": "2026-11-23T12:00:00Z",
        "command": ["rocmux", "bench"],
        "settings": {
            "prompt_tokens": 64,
            "gen_tokens": gen_tokens,
            "concurrency": [1, 4],
            "rounds": 1,
        },
        "environment": {"rocmux": "0.1.0", "host_cpu": "Test CPU", "cpu_count": 2, "gpus": []},
        "runs": [
            _run(
                "llamacpp_hip",
                [
                    _level(1, 100 * scale, 20.0, 100 * scale, 300 << 20),
                    _level(4, 300 * scale, 40.0, 75 * scale, 400 << 20),
                ],
            ),
            _run("hip_direct", [_level(1, 20.0, 80.0, 20.0, 900 << 20)]),
        ],
    }


def test_compare_prints_the_change_per_row(tmp_path, capsys):
    old_doc = _doc()
    new_doc = _doc(gen_tokens=32, scale=2.0)
    new_doc["runs"][1]["levels"][0]["concurrency"] = 2  # only in new; c=1 only in old
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(old_doc))
    new.write_text(json.dumps(new_doc))
    code, out, _ = _bench(capsys, "--from-json", str(new), "--compare", str(old))
    assert code == 0
    assert "change against old.json" in out
    assert "+100.0%" in out  # aggregate and decode doubled
    assert "only in new" in out and "only in old.json" in out
    assert "the runs differ in gen_tokens: 16 -> 32" in out

    items = {item.key: item for item in compare(old_doc, new_doc)}
    row = items[("m.gguf", "llamacpp_hip", "", 4)]
    assert row.changes()["aggregate_tps"] == pytest.approx(100.0)
    assert row.changes()["ttft_ms_median"] == pytest.approx(0.0)
    assert items[("m.gguf", "hip_direct", "", 2)].old is None
    assert items[("m.gguf", "hip_direct", "", 1)].new is None


def test_plot_and_table_from_a_saved_run(tmp_path, capsys):
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(_doc()))
    png = tmp_path / "plots" / "bench.png"
    png.parent.mkdir()
    code, out, err = _bench(capsys, "--from-json", str(saved), "--plot", str(png))
    assert code == 0
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert f"plot written to {png}" in err
    # The table shows the memory a run added over its baseline.
    assert "+200 MiB RSS" in out and "hip_direct" in out
    markdown = markdown_table(load_document(saved))
    assert len(markdown.splitlines()) == 2 + 3  # header, rule, three rows
    assert "| m.gguf | llamacpp_hip | 4 | 40.0 |" in markdown


def test_failed_run_gives_status_1_and_a_row(tmp_path, capsys):
    doc = _doc()
    doc["runs"][0]["levels"][0]["other_cpu_cores"] = 1.3
    doc["runs"][1]["levels"] = []
    doc["runs"][1]["error"] = "StartupFailed: boom"
    saved = tmp_path / "failed.json"
    saved.write_text(json.dumps(doc))
    code, out, _ = _bench(capsys, "--from-json", str(saved))
    assert code == 1
    assert "StartupFailed: boom" in out
    assert "busy host: others used 1.3 cores" in out
    doc["environment"]["cpu_count"] = 16  # 1.3 of 16 cores is no disturbance
    saved.write_text(json.dumps(doc))
    _, out, _ = _bench(capsys, "--from-json", str(saved))
    assert "busy host" not in out


# -- pieces --------------------------------------------------------------------------------------


def test_sweep_values_parse_by_field_type():
    sweep = Sweep.parse("flash-attn=on,off,auto")
    assert sweep.field == "flash_attn"
    assert [c.flash_attn for _, c in sweep.configs(LoadConfig())] == [True, False, None]
    ctx = Sweep.parse("context_len=2048,8192").configs(LoadConfig(threads=2))
    assert [(label, c.context_len, c.threads) for label, c in ctx] == [
        ("context_len=2048", 2048, 2),
        ("context_len=8192", 8192, 2),
    ]
    assert Sweep.parse("devices=0+1,cpu").configs(LoadConfig())[0][1].devices == ("0", "1")
    with pytest.raises(BenchUsageError, match="integers"):
        Sweep.parse("context_len=big")
    with pytest.raises(BenchUsageError, match="must be a positive integer"):
        Sweep.parse("context_len=-5").configs(LoadConfig())


def test_context_and_slots_follow_the_runtime():
    settings = BenchSettings(prompt_tokens=512, gen_tokens=128, concurrency=(1, 8, 32))
    llama = fill_load(LoadConfig(), settings, "llamacpp_hip")
    assert llama.parallel == 32 and llama.context_len == 768 * 32  # shared by the slots
    direct = fill_load(LoadConfig(), settings, "hip_direct")
    assert direct.parallel == 32 and direct.context_len == 768  # per sequence
    given = fill_load(LoadConfig(context_len=4096, parallel=4), settings, "llamacpp_hip")
    assert (given.context_len, given.parallel) == (4096, 4)
    jobs = plan_jobs(
        [Path("a.gguf")],
        ["llamacpp_hip", "hip_direct"],
        LoadConfig(),
        settings,
        Sweep.parse("context_len=auto,2048"),
    )
    assert [(j.backend, j.setting, j.load.context_len) for j in jobs] == [
        ("llamacpp_hip", "context_len=auto", None),  # the swept field is left alone
        ("llamacpp_hip", "context_len=2048", 2048),
        ("hip_direct", "context_len=auto", None),
        ("hip_direct", "context_len=2048", 2048),
    ]


def test_prompts_have_the_planned_words_and_differ():
    plan = benchmark.PromptPlan(target=40, words=39, special_tokens=1, one_token_words=True)
    make = benchmark.PromptMaker(plan)
    prompts = [make() for _ in range(20)]
    assert all(len(p.split()) == 39 and p.startswith("the ") for p in prompts)
    assert all(w in benchmark.WORDS for p in prompts for w in p.split())
    # Two prompts share at most their first word: no runtime prompt cache can help.
    heads = {tuple(p.split()[1:4]) for p in prompts}
    assert len(heads) == 20
    again = benchmark.PromptMaker(plan)
    assert [again() for _ in range(20)] == prompts  # seeded


def test_percentile():
    assert benchmark.percentile([], 0.5) is None
    assert benchmark.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert benchmark.percentile([0.0, 10.0], 0.9) == pytest.approx(9.0)


def test_tree_rss_counts_child_processes():
    before = benchmark.tree_rss()
    assert before is not None and before > 10 << 20
    child = subprocess.Popen(
        [sys.executable, "-c", "b = b'x' * (200 << 20); import time; time.sleep(30)"]
    )
    try:
        deadline = time.monotonic() + 20
        grown = 0
        while time.monotonic() < deadline:
            grown = (benchmark.tree_rss() or 0) - before
            if grown > 150 << 20:
                break
            time.sleep(0.05)
        assert grown > 150 << 20
    finally:
        child.kill()
        child.wait()


def test_memory_monitor_keeps_the_peak_of_a_window():
    with benchmark.ResourceMonitor(None, interval=0.01) as monitor:
        start = time.perf_counter()
        block = bytearray(100 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1  # touch every page so it is resident
        time.sleep(0.1)
        del block
        time.sleep(0.05)
        now = monitor.sample()
    peak_rss, peak_gpu = monitor.peak(start)
    assert peak_gpu is None
    assert peak_rss is not None and now.rss is not None
    assert peak_rss - now.rss > 80 << 20


def test_cpu_of_other_processes_is_told_from_ours():
    busy = "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < 1.5: pass"
    # Outside our tree: a grandchild whose parent exits at once (it goes to init).
    launcher = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', {busy!r}], start_new_session=True)"
    )
    with benchmark.ResourceMonitor(None, interval=0.05) as monitor:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", launcher], check=True)
        time.sleep(1.3)
        outside = monitor.other_cpu(start)
        before = benchmark.tree_usage().cpu
        child = subprocess.Popen([sys.executable, "-c", busy])  # inside our tree
        time.sleep(1.3)
        inside = (benchmark.tree_usage().cpu or 0) - (before or 0)
        child.wait()
    assert outside is not None and outside > 0.3
    assert inside > 0.3


def test_peak_memory_prefers_the_gpu_when_it_moved():
    memory = {"rss_baseline": 100, "gpu_baseline": 1 << 30}
    assert peak_memory({"rss_peak": 300, "gpu_peak": 3 << 30}, memory) == (2 << 30, "GPU")
    assert peak_memory({"rss_peak": 300, "gpu_peak": 1 << 30}, memory) == (200, "RSS")
    doc = _doc()
    doc2 = copy.deepcopy(doc)
    assert compare(doc, doc2)[0].changes()["peak_memory"] == 0.0


def test_nvidia_smi_stands_in_for_nvml(tmp_path, monkeypatch):
    import rocmux.devices

    tool = tmp_path / "nvidia-smi"
    tool.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  --query-gpu=name,memory.used) echo "NVIDIA H100 80GB HBM3, 1234";;\n'
        '  --query-gpu=memory.used) echo "1500";;\n'
        "  --query-gpu=index,name,memory.total,driver_version)"
        ' echo "0, NVIDIA H100 80GB HBM3, 81559, 550.54.15";;\n'
        "esac\n"
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(rocmux.devices, "detect_gpus", lambda *a, **k: [])
    monkeypatch.setattr(benchmark, "driver_versions", lambda: {"kernel": "test"})
    monitor = benchmark.gpu_monitor()
    assert monitor is not None and monitor.source == "nvidia-smi"
    assert monitor.names == ("NVIDIA H100 80GB HBM3",)
    assert monitor.read() == 1500 << 20
    env = benchmark.environment()
    assert env["gpus"] == [
        {
            "id": "CUDA0",
            "name": "NVIDIA H100 80GB HBM3",
            "vendor": "nvidia",
            "memory_total": 81559 << 20,
        }
    ]
    assert env["drivers"]["nvidia"] == "550.54.15"
