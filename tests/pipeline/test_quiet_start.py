"""A first run that looks right (issue 14 item 1): no TensorFlow / absl / CUDA start-up lines
unless --verbose, and everything else on stderr passes through unchanged."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline._common import cli_message
from pipeline._quiet import is_noise

ROOT = Path(__file__).resolve().parents[2]
# Lines TensorFlow 2.21 printed on this project's CPU machines (issue 14).
NOISE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1796652296.946957    5111 port.cc:153] oneDNN custom operations are on. You may see slightly "
    b"different numerical results due to floating-point round-off errors from different computation orders.",
    b"I0000 00:00:1796652296.972071    5111 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
    b"will not be used.",
    b"To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other operations, "
    b"rebuild TensorFlow with the appropriate compiler flags.",
    b"E0000 00:00:1796652312.641712    5111 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    b"Failed call to cuInit: UNKNOWN ERROR (303)",
]


def _stderr_of(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    return done.stderr.decode()


def test_noise_lines_are_recognised_and_ours_are_not():
    assert all(is_noise(line) for line in NOISE)
    for ours in (b"INFO features.extract: backbone efficientnet_lite0 runs on CPU (TensorFlow sees no GPU)",
                 b"python -m pipeline.predict: error: --out is required",
                 b"Traceback (most recent call last):", b"E0000 is not a log line"):
        assert not is_noise(ours)


def test_filter_drops_noise_and_passes_the_rest_in_order():
    noise = "".join(f"os.write(2, {line!r} + b'\\n'); " for line in NOISE)
    code = ("import os, sys; from pipeline._quiet import silence_library_startup; silence_library_startup(); "
            "print('first', file=sys.stderr, flush=True); " + noise +
            "os.write(2, b'bar  10%\\rbar  50%\\rbar 100%\\n'); "
            "print('last', file=sys.stderr, flush=True)")
    assert _stderr_of(code) == "first\nbar  10%\rbar  50%\rbar 100%\nlast\n"


def test_tensorflow_start_up_is_silent():
    code = ("import sys; from pipeline._quiet import silence_library_startup; silence_library_startup(); "
            "import tensorflow as tf; tf.config.list_physical_devices('GPU'); print('done', file=sys.stderr)")
    err = _stderr_of(code)
    assert err.strip().splitlines()[-1] == "done"
    for marker in ("I0000", "E0000", "cuInit", "absl::InitializeLog", "oneDNN", "cuda drivers"):
        assert marker not in err, err


@pytest.mark.parametrize("module", ["extract", "cv_report", "train", "predict", "heatmap"])
def test_every_cli_has_verbose(module, capsys):
    main = __import__(f"pipeline.{module}", fromlist=["main"]).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--verbose" in text
    assert "(default: None)" not in text and "(default: False)" not in text  # issue 14 item 5
    assert not re.search(r"\(default [^()]*\) \(default: ", text)


def test_two_class_labels_error_names_the_parameter_and_the_cli_its_flag():
    from data.labels import map_labels
    from pipeline import cv_report

    with pytest.raises(ValueError) as err:
        map_labels(["benign", "malignant", "benign"], "bach4")
    assert "`scheme`" in str(err.value) and "source_scheme" not in str(err.value)
    assert "schemes: --labels)" in cli_message(cv_report.build_parser(), str(err.value))


def test_cli_message_puts_library_parameters_in_the_cli_words():
    from pipeline import cv_report, patch_cnn

    parser = cv_report.build_parser()
    assert cli_message(parser, "Use `n_folds=3` or `out` x; `window` `stain_reference`", cv_report.FLAGS) == (
        "Use --folds 3 or --out x; `window` --two-stage-stain")  # no --window in cv_report: kept
    assert cli_message(patch_cnn.build_parser(), "(`convention='pixels'`) (`outside='drop'`)", patch_cnn.FLAGS) == (
        "(--coordinates pixels) (--drop-outside-points)")  # options of a sub-command count


def test_a_worker_holding_stderr_does_not_delay_the_exit(tmp_path):
    # A worker process inherits the filtered fd 2; the filter must not wait for it to close.
    code = ("import subprocess, sys; from pipeline._quiet import silence_library_startup; "
            "silence_library_startup(); child = subprocess.Popen(['sleep', '20'], stdout=subprocess.DEVNULL); "
            "print('bye', file=sys.stderr); print(child.pid)")
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        tic = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=err, timeout=60)
        seconds = time.perf_counter() - tic
    os.kill(int(done.stdout), signal.SIGTERM)
    assert done.returncode == 0 and log.read_text() == "bye\n"
    assert seconds < 4.5  # not the 5 s join timeout, nor the child's 20 s


def test_last_line_stays_last_when_stdout_and_stderr_share_a_file(tmp_path):
    # Logs pass through the filter's pipe; the path to open must still be the file's last line.
    code = ("import logging, sys; from pipeline._quiet import silence_library_startup; "
            "from pipeline._common import print_last; silence_library_startup(); "
            "logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
            "[logging.getLogger('x').info('log line %d', i) for i in range(200)]; "
            "print_last('report: /r/report.html')")
    log = tmp_path / "out.txt"
    with open(log, "wb") as out:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              timeout=60)
    lines = log.read_text().splitlines()
    assert done.returncode == 0 and len(lines) == 201
    assert lines[-1] == "report: /r/report.html" and lines[-2] == "INFO:x:log line 199"
