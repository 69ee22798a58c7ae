"""`gpt2 serve --ray`: replicas on a local Ray instance bound to loopback, one CPU each, tiny
checkpoints, driven through Ray's HTTP proxy by the official openai client and raw HTTP. Every
wait is bounded in time."""

import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import openai
import pytest
from test_server import GPT2_COMMAND, NAME, Server, server, wait_until  # noqa: F401 (server: the plain server, compared with)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

RAY = ("--ray", "--cpus-per-replica", "1", "--max-batch", "4")
HEADER = "x-gpt2engine-replica"


def replica_pids() -> list[int]:
    """The processes of our Serve replicas (Ray names them in their command line)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ServeReplica:gpt2engine" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def wait_for(condition, seconds: float, what: str) -> None:
    wait_until(condition, seconds, what, poll=0.5)  # each check asks Ray or scans /proc


def replica_of(ray: Server) -> str:
    response = ray.post("/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert response.status_code == 200, response.text
    return response.headers[HEADER]


# First, before the module's fixed pair of replicas starts: it counts replica processes.
def test_autoscaling_from_one_to_two_replicas_under_load_and_back(tiny_checkpoint):
    scaling = Server(tiny_checkpoint, *RAY, "--min-replicas", "1", "--max-replicas", "2",
                     "--upscale-delay", "1", "--downscale-delay", "2", ready_within=240)
    try:
        assert len(replica_pids()) == 1
        busy = threading.Event()

        def load() -> None:
            while not busy.is_set():
                scaling.post("/v1/completions", {"prompt": "Hello", "max_tokens": 100, "ignore_eos": True})

        workers = [threading.Thread(target=load) for _ in range(6)]
        for worker in workers:
            worker.start()
        try:
            wait_for(lambda: len(replica_pids()) == 2, 120, "a second replica under load")
            wait_for(lambda: httpx.get(f"{scaling.url}/health", timeout=30).status_code == 200, 120,
                     "the second replica to run")
        finally:
            busy.set()
            for worker in workers:
                worker.join(timeout=60)
        wait_for(lambda: len(replica_pids()) == 1, 120, "the scale-down to one replica")
        assert replica_of(scaling)
    finally:
        code, err = scaling.stop()
    assert code == 0 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def ray(tiny_checkpoint):
    running = Server(tiny_checkpoint, *RAY, "--replicas", "2", "--max-queue", "4", ready_within=240)
    yield running
    code, err = running.stop()
    assert code == 0 and "Traceback" not in err, err
    assert not replica_pids()  # the replicas went with it


def test_the_openai_client_gets_what_the_plain_server_gives(ray, server):  # noqa: F811
    prompts = ["Hello, my name is", "The storm"]
    for prompt in prompts:
        answers = [openai.OpenAI(base_url=f"{s.url}/v1", api_key="none").completions.create(
            model=NAME, prompt=prompt, max_tokens=12, temperature=0).choices[0].text for s in (ray, server)]
        assert answers[0] == answers[1]
        stream = openai.OpenAI(base_url=f"{ray.url}/v1", api_key="none").completions.create(
            model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == answers[0]


def test_requests_spread_over_the_replicas_and_health_waits_for_all(ray):
    assert httpx.get(f"{ray.url}/health", timeout=30).status_code == 200
    # one after another: Ray counts a request as queued until its router has placed it, so a burst
    # beyond this fixture's queue of 4 could meet backpressure even with rows free
    served = [replica_of(ray) for _ in range(16)]
    assert len(set(served)) == 2, served


def test_past_the_rows_and_the_queue_requests_get_503_with_retry_after(ray):
    # 2 replicas x 4 rows + a queue of 4 = 12 requests at once; 40 long ones overflow it
    statuses: list[httpx.Response] = []
    body = {"prompt": "Hello", "max_tokens": 120, "ignore_eos": True}
    threads = [threading.Thread(target=lambda: statuses.append(ray.post("/v1/completions", body)))
               for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    refused = [r for r in statuses if r.status_code == 503]
    assert len(statuses) == 40 and refused and all(r.headers.get("retry-after") for r in refused)
    assert {r.status_code for r in statuses} == {200, 503}  # the rest are served


def aborted_on_each_replica(ray: Server) -> dict[str, float]:
    """Each replica keeps its own counters: ask until both have answered /metrics."""
    seen: dict[str, float] = {}
    for _ in range(50):
        response = httpx.get(f"{ray.url}/metrics", timeout=30)
        [value] = [line.split()[-1] for line in response.text.splitlines()
                   if line.startswith("gpt2engine_requests_aborted_total ")]
        seen[response.headers[HEADER]] = float(value)
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only {sorted(seen)} answered /metrics")


def test_a_client_that_disconnects_cancels_its_request_on_the_replica(ray):
    before = sum(aborted_on_each_replica(ray).values())
    body = {"prompt": "Hello", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{ray.url}/v1/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # the first event: it is running; then hang up
    wait_for(lambda: sum(aborted_on_each_replica(ray).values()) > before, 60, "the abort on the replica")


def test_a_killed_replica_is_replaced_and_requests_keep_succeeding(ray):
    before = {replica_of(ray) for _ in range(10)}
    victim = replica_pids()[0]
    os.kill(victim, signal.SIGKILL)
    for _ in range(5):  # the survivor serves meanwhile
        replica_of(ray)
    wait_for(lambda: victim not in replica_pids() and len(replica_pids()) == 2
             and httpx.get(f"{ray.url}/health", timeout=30).status_code == 200, 180, "a replacement replica")
    wait_for(lambda: replica_of(ray) not in before, 60, "the replacement to serve a request")


@pytest.mark.parametrize(("flags", "message"), [
    (["--replicas", "2", "--max-replicas", "3"], "--replicas is a fixed count"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--max-replicas 2 is below --min-replicas 3"),
    (["--cpus-per-replica", "0"], "argument --cpus-per-replica: must be a positive integer"),
])
def test_conflicting_scaling_flags_are_one_line_and_exit_2(tiny_checkpoint, flags, message):
    done = subprocess.run([GPT2_COMMAND, "serve", "--ray", "--model", str(tiny_checkpoint), *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1
