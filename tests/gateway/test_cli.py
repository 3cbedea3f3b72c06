"""`python -m sample_gateway` as a real subprocess: the demo, a config file, start-up errors."""

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Upstream
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


@contextlib.asynccontextmanager
async def gateway_process(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sample_gateway",
        *args,
        "--log-level",
        "warning",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await asyncio.wait_for(process.wait(), 10)


async def wait_until_up(process: asyncio.subprocess.Process, url: str) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as http:
        while True:
            if process.returncode is not None:
                assert process.stderr is not None
                raise AssertionError((await process.stderr.read()).decode())
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url + "/healthz", timeout=1)).status_code == 200:
                    return
            assert time.monotonic() < deadline, "the gateway did not start in time"
            await asyncio.sleep(0.1)


async def test_the_demo_starts_prints_what_to_curl_and_serves() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with gateway_process("--port", str(port)) as process:
        await wait_until_up(process, base)
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            hellos = [await http.get("/api/hello") for _ in range(4)]
            instances = Counter([response.json()["instance"] for response in hellos])
            canary = {
                (await http.get("/api/hello", headers={"x-canary": "1"})).json()["instance"] for _ in range(3)
            }
            ready = await http.get("/readyz")
            admin = await http.get("/_admin/services", headers={"authorization": "Bearer demo-admin-key"})
            denied = await http.get("/_admin/services")
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 15)
        assert process.stdout is not None
        printed = (await process.stdout.read()).decode()
    assert instances == {"demo-1": 2, "demo-2": 2}
    # One Date, set by the server in front (the upstream's is dropped), and no Server advertising uvicorn.
    assert all(len(response.headers.get_list("date")) == 1 for response in hellos)
    assert all("server" not in response.headers for response in hellos)
    assert canary == {"demo-2"}
    assert ready.status_code == 200
    assert [t["id"] for t in admin.json()["services"][0]["targets"]] == ["demo-1", "demo-2"]
    assert denied.status_code == 401
    assert f"curl -i {base}/api/hello" in printed and "demo-admin-key" in printed
    assert process.returncode == 0


async def test_a_config_file_with_its_own_admin_listener(tmp_path: Path, upstream: Upstream) -> None:
    port, admin_port = free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(
        json.dumps(
            {
                "listen": {"port": 1},  # --port wins
                "services": [{"name": "echo", "targets": [{"url": upstream.url}]}],
                "routes": [{"path": "/*", "service": "echo"}],
                "admin": {"listen": {"host": "127.0.0.1", "port": admin_port}, "api_keys": ["k1"]},
            }
        )
    )
    base = f"http://127.0.0.1:{port}"
    async with gateway_process("--config", str(path), "--port", str(port)) as process:
        await wait_until_up(process, base)
        async with httpx.AsyncClient(timeout=10) as http:
            proxied = await http.get(base + "/hello")
            on_main = await http.get(base + "/_admin/services", headers={"x-admin-key": "k1"})
            admin = await http.get(f"http://127.0.0.1:{admin_port}/services", headers={"x-admin-key": "k1"})
            reload = await http.post(f"http://127.0.0.1:{admin_port}/reload", headers={"x-admin-key": "k1"})
    assert proxied.status_code == 200 and proxied.json()["path"] == "/hello"
    assert on_main.json()["path"] == "/_admin/services"  # no admin prefix on the main listener: proxied
    assert admin.status_code == 200 and admin.json()["services"][0]["name"] == "echo"
    assert reload.status_code == 200 and reload.json()["reloaded"] is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen: {port: 0}\n", "listen.port: Input should be greater than or equal to 1"),
        ("services: [{name: a, targets: [{url: 'http://h:1/x'}]}]\n", "services[0].targets[0].url: must be"),
        ("routes: [{path: /x, service: nope}]\n", "routes[0].service: unknown service 'nope'"),
    ],
)
def test_a_bad_config_fails_start_up_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "sample_gateway", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr.decode()


def test_check_validates_the_example() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sample_gateway", "--config", "examples/gateway.yaml", "--check"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "examples/gateway.yaml: valid (4 services, 4 routes)"


async def test_several_workers_serve_one_config(tmp_path: Path, upstream: Upstream) -> None:
    port = free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(
        json.dumps(
            {
                "services": [{"name": "echo", "targets": [{"url": upstream.url}]}],
                "routes": [{"path": "/*", "service": "echo"}],
                "admin": {"api_keys": ["k1"]},
            }
        )
    )
    base = f"http://127.0.0.1:{port}"
    async with gateway_process("--config", str(path), "--port", str(port), "--workers", "2") as process:
        await wait_until_up(process, base)
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            responses = [await http.get(f"/w/{index}") for index in range(6)]
            ready = await http.get("/readyz")
    assert [response.json()["path"] for response in responses] == [f"/w/{index}" for index in range(6)]
    assert all(len(response.headers.get_list("date")) == 1 for response in responses)
    assert all("server" not in response.headers for response in responses)
    assert ready.status_code == 200
