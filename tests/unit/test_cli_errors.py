"""What a newcomer's first mistakes print: one line with what to do, never a traceback."""
import subprocess
import sys
from pathlib import Path

from streams.stack.local import free_port

ROOT = Path(__file__).resolve().parents[2]


def imagefork(*argv: str, **env: str) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "streams", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def test_submit_of_a_file_that_is_not_there_is_one_line_naming_the_example():
    proc = imagefork("submit", "nosuch.json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "imagefork: cannot read the request nosuch.json: No such file or directory (examples/request.json is "
        "the seed's request, to copy)"]


def test_submit_with_no_broker_is_one_line_with_the_address_and_the_hint():
    from concurrent.futures import ThreadPoolExecutor
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with ThreadPoolExecutor(2) as pool:  # each waits out the client's patience: side by side
        procs = list(pool.map(lambda wait: imagefork("submit", "examples/request.json", *wait,
                                                     KAFKA_BOOTSTRAP_SERVERS=address), ((), ("--wait",))))
    for proc in procs:
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"imagefork: Kafka at {address}: ") and "imagefork stack up" in lines[0], lines
        assert "stack.env" in lines[0]


def test_submit_of_an_output_certain_to_be_too_large_is_refused_before_sending(tmp_path):
    request = tmp_path / "big.json"
    request.write_text('{"fileLocation": "http://127.0.0.1:1/x.png", "outputFormats": ["png"], '
                       '"outputSizes": [{"width": 9000, "height": 9000}], "maintainAspectRatio": false}')
    proc = imagefork("submit", str(request), KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "outputSizes[0]: 9000x9000 is 81.0 megapixels" in lines[0] and "7745x7745" in lines[0], lines
