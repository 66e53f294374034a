"""The status page at GET /, rendered by a real headless Chromium against a live coordinator.

Agents and clients supply most of what the page shows, so the test feeds it hostile strings
(task descriptions, an agent's output and error) and checks that they come out as text, with
no element injected and no script run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import struct
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

from coordinator_agent.agent.worker import TaskContext
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.ops.statuspage import page
from coordinator_agent.wire import protocol

from .conftest import StartWorker
from .helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
ARTIFACT = REPO / "var" / "artifacts" / "status-page.png"
CHROMIUM_TIMEOUT_S = 60
WINDOW = (1280, 900)

HOSTILE_DESCRIPTION = "<img src=x onerror=alert(1)>"
HOSTILE_OUTPUT = "</td></tr><script>document.title='pwned-output'</script><u id=injected>x</u>"
HOSTILE_ERROR = "<svg onload=\"document.title='pwned-error'\"></svg>"


def chromium_binary() -> str:
    path = (os.environ.get("COORDINATOR_TEST_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))
    if path is None:
        pytest.fail(
            "chromium is not installed, and the status page is tested in a real browser: "
            "install it with `scripts/tools.sh chromium` (or `apt-get install -y "
            "--no-install-recommends chromium`), or point COORDINATOR_TEST_CHROMIUM at one.",
            pytrace=False,
        )
    return path


async def run_chromium(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium without blocking the event loop the coordinator serves from."""
    command = [
        chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
        "--disable-extensions", "--disable-background-networking", "--disable-sync",
        "--hide-scrollbars", "--mute-audio", f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its renderer and GPU helpers go with it on a timeout
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), CHROMIUM_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S}s: {command}")
    assert process.returncode == 0, (
        f"chromium exited {process.returncode}: {stderr.decode(errors='replace')[-2000:]}"
    )
    return stdout.decode("utf-8")


@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self) -> list[Node]:
        found = [self]
        for child in self.children:
            if isinstance(child, Node):
                found.extend(child.walk())
        return found


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class TreeBuilder(HTMLParser):
    """Enough of a DOM to look at what Chromium serialised (it writes well-formed markup)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def by_id(root: Node, element_id: str) -> Node:
    matches = [n for n in root.walk() if n.attrs.get("id") == element_id]
    assert len(matches) == 1, f"expected one #{element_id}, found {len(matches)}"
    return matches[0]


def png_summary(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the decoded pixels) of a PNG; asserts validity."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    offset, idat, width, height, channels = 8, b"", 0, 0, 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        chunk = data[offset + 8:offset + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8, f"unexpected bit depth {depth}"
            channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
        elif kind == b"IDAT":
            idat += chunk
        offset += 12 + length
    pixels = zlib.decompress(idat)
    assert len(pixels) == height * (1 + width * channels), "truncated image data"
    return width, height, len(set(pixels))


async def echo_handler(task: TaskContext) -> object:
    """An agent that echoes hostile text back, or fails with it."""
    params = task.input if isinstance(task.input, dict) else {}
    if params.get("op") == "fail":
        raise RuntimeError(HOSTILE_ERROR)
    return {"echo": HOSTILE_OUTPUT}


async def test_status_page_renders_live_data_and_escapes_agent_strings(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    tmp_path: Path,
) -> None:
    chromium_binary()  # fail first, and clearly, when there is no browser
    await start_worker("agent-1", "general", capabilities=["text", "hash"])
    await start_worker("agent-2", "echo", handler=echo_handler)

    submitted = {
        await client.submit("Count the words in this sentence",
                            input={"op": "stats"}, kind="general"): "succeeded",
        await client.submit(HOSTILE_DESCRIPTION, input={"op": "stats"}, kind="general"):
            "succeeded",
        await client.submit("echo something nasty", kind="echo"): "succeeded",
        await client.submit("fail with something nasty", kind="echo", input={"op": "fail"},
                            max_retries=0): "failed",
    }
    for task_id, expected in submitted.items():
        done = await client.wait(task_id, 30)
        assert done.status == expected, (task_id, done)

    base = f"http://127.0.0.1:{coordinator.monitoring.port}/"
    async with aiohttp.ClientSession() as session, session.get(base) as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy
        assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
        served = await response.text()
        async with session.get(base + "api/agents") as agents_response:
            api_agents = (await agents_response.json())["agents"]
        async with session.get(base + "api/tasks?limit=50") as tasks_response:
            api_tasks = {t["id"]: t for t in (await tasks_response.json())["tasks"]}
    assert "https://" not in served and "http://" not in served, "the page must work offline"

    dom = await run_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", base)
    root = parse(dom)
    body = next(n for n in root.walk() if n.tag == "body")
    assert body.attrs.get("data-state") == "live", f"page never loaded its data: {dom[:2000]}"
    assert int(body.attrs.get("data-polls") or 0) >= 2, "the page should poll repeatedly"

    # Live agents, with liveness, load and (when the API reports them) liveness signals.
    agent_rows = {n.attrs.get("data-agent-id"): n for n in by_id(root, "agents").walk()
                  if n.tag == "tr" and n.attrs.get("data-agent-id")}
    assert set(agent_rows) == {"agent-1", "agent-2"}
    for view in api_agents:
        row_text = agent_rows[view["id"]].text()
        assert view["kind"] in row_text and "healthy" in row_text, row_text
        assert f"{view['in_flight']} / {view['max_concurrency']}" in row_text
        assert any(n.tag == "meter" for n in agent_rows[view["id"]].walk()), "no load meter"
        amqp = (view.get("signals") or {}).get("amqp")
        if isinstance(amqp, dict) and amqp.get("heard"):
            assert "amqp" in row_text, f"signals not shown: {row_text}"

    # Recent tasks with status and routing.
    task_rows = {n.attrs.get("data-task-id"): n for n in by_id(root, "tasks").walk()
                 if n.tag == "tr" and n.attrs.get("data-task-id")}
    assert set(submitted) <= set(task_rows)
    for task_id, expected in submitted.items():
        row_text = task_rows[task_id].text()
        assert task_id in row_text and expected in row_text, row_text
        assert "→ agent-" in row_text, f"no routing decision shown: {row_text}"
        assert f"priority {api_tasks[task_id]['priority']}" in row_text or "priority medium" \
            in row_text, f"no priority shown: {row_text}"
        routing = api_tasks[task_id]["routing"]
        if isinstance(routing.get("confidence"), float):
            assert f"conf {routing['confidence']:.2f}" in row_text, row_text
        if routing.get("kind"):
            assert f"{routing['kind']} → " in row_text, row_text

    # Totals and a rate computed from successive /api/status answers.
    assert by_id(root, "rate").text().endswith("tasks/s")
    assert "succeeded 3" in by_id(root, "totals").text()
    assert by_id(root, "name").text() == coordinator.settings.name

    # Hostile strings are text, not markup, and nothing they carried ran.
    page_text = root.text()
    for hostile in (HOSTILE_DESCRIPTION, HOSTILE_OUTPUT, HOSTILE_ERROR):
        assert hostile in page_text, f"{hostile!r} should be shown as text"
    elements = root.walk()
    assert not [n for n in elements if n.tag in ("img", "svg", "u")], "an element was injected"
    assert [n.tag for n in elements].count("script") == 1, "only the page's own script"
    assert not [n for n in elements if any(a.startswith("on") for a in n.attrs)]
    assert not [n for n in elements if n.attrs.get("id") == "injected"]
    title = next(n for n in elements if n.tag == "title").text()
    assert "pwned" not in title and title.startswith(coordinator.settings.name)

    # A screenshot for people to look at (and a check that it is not a blank page).
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.unlink(missing_ok=True)
    await run_chromium(tmp_path, "--virtual-time-budget=5000", f"--screenshot={ARTIFACT}",
                       f"--window-size={WINDOW[0]},{WINDOW[1]}", base)
    data = ARTIFACT.read_bytes()
    width, height, distinct = png_summary(data)
    assert (width, height) == WINDOW
    assert len(data) > 20_000 and distinct > 32, "the screenshot looks blank"


def test_the_page_builds_its_dom_from_text_only() -> None:
    """The shipped page: no HTML-from-strings APIs, no external assets, a CSP that fits it."""
    body, policy = page()
    html = body.decode("utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "srcdoc"):
        assert sink not in html, f"the page uses {sink}"
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<[^>]*\s(style|on[a-z]+)=", html), "the CSP blocks inline attributes"
    assert html.count("<script>") == 1 and html.count("<style>") == 1
    script = html.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy
    assert "unsafe" not in policy and "frame-ancestors 'none'" in policy


# --- a narrow window, and the first paint ------------------------------------------------------

NARROW = (800, 1400)
NARROW_ARTIFACT = REPO / "var" / "artifacts" / "status-page-800.png"
LAYOUT_PROBE = """(() => {
  const px = (v) => parseFloat(v) || 0;
  const tables = [...document.querySelectorAll('.table-wrap')].map((w) => ({
    table: w.querySelector('table').id, scroll: w.scrollWidth, client: w.clientWidth}));
  const ids = [...document.querySelectorAll('.id')].map((e) => {
    const style = getComputedStyle(e);
    return {text: e.textContent, height: e.getBoundingClientRect().height,
            line: px(style.lineHeight) || px(style.fontSize) * 1.4};
  });
  return {page: document.documentElement.scrollWidth, window: window.innerWidth, tables, ids,
          state: document.body.dataset.state, legend: document.querySelector('.legend')
            ? document.querySelector('.legend').textContent : ''};
})()"""


async def measure_layout(tmp_path: Path, url: str, window: tuple[int, int]) -> dict[str, object]:
    """Open ``url`` in headless Chromium and evaluate LAYOUT_PROBE over the DevTools protocol."""
    command = [
        chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
        "--hide-scrollbars", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
        f"--window-size={window[0]},{window[1]}",
        f"--user-data-dir={tmp_path / 'chromium-layout'}", url,
    ]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    try:
        assert process.stderr is not None
        endpoint = None
        while endpoint is None:
            line = await asyncio.wait_for(process.stderr.readline(), CHROMIUM_TIMEOUT_S)
            assert line, "chromium exited before it opened its DevTools endpoint"
            found = re.search(rb"DevTools listening on ws://([^/]+)/", line)
            endpoint = found.group(1).decode() if found else None
        async with aiohttp.ClientSession() as session:
            for _ in range(100):  # the page target appears once the tab has opened
                async with session.get(f"http://{endpoint}/json/list") as response:
                    pages = [t for t in await response.json() if t.get("type") == "page"]
                if pages and pages[0].get("url", "").startswith(url):
                    break
                await asyncio.sleep(0.1)
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"]) as ws:
                ready = ("location.href.startsWith('http') && document.readyState === 'complete'"
                         " && !!document.body && document.body.dataset.state === 'live'")
                for attempt in range(100):  # until the status page has loaded and rendered
                    await ws.send_json({"id": attempt, "method": "Runtime.evaluate", "params": {
                        "expression": ready, "returnByValue": True}})
                    reply = await ws.receive_json(timeout=10)
                    while reply.get("id") != attempt:
                        reply = await ws.receive_json(timeout=10)
                    if reply.get("result", {}).get("result", {}).get("value") is True:
                        break
                    await asyncio.sleep(0.1)
                await ws.send_json({"id": 1000, "method": "Runtime.evaluate", "params": {
                    "expression": LAYOUT_PROBE, "returnByValue": True}})
                while True:
                    reply = await ws.receive_json(timeout=10)
                    if reply.get("id") == 1000:
                        assert "value" in reply["result"]["result"], reply
                        return reply["result"]["result"]["value"]  # type: ignore[no-any-return]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


async def test_status_page_fits_800_px_and_shows_data_on_its_first_paint(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    tmp_path: Path,
) -> None:
    chromium_binary()
    long_id = "agent-with-a-rather-long-identifier-7f3a9c"
    coordinator.keyring.generate(long_id, "agent")
    coordinator.security.reload(coordinator.keyring)
    worker = await start_worker("agent-1", "general", capabilities=["text", "hash", "sleep"])
    await worker.send(protocol.AgentMetrics(values={"cpu_percent": 37.5, "queue_depth": 2}))
    await start_worker(long_id, "security", capabilities=["hash"])
    for text in ("Count the words in this sentence, which is long enough to be cut short "
                 "in a narrow window", "Audit the digest of this release"):
        done = await client.wait(await client.submit(text, input={"op": "stats"}), 30)
        assert done.status == "succeeded"
    waiting = await client.submit("Scan for secrets", kind="nosuchkind", timeout_s=300)
    await wait_until(lambda: waiting in coordinator.state.tasks
                     and bool(coordinator.state.agents["agent-1"].metrics), 10,
                     "the waiting task and the agent's metrics")
    base = f"http://127.0.0.1:{coordinator.monitoring.port}/"

    # One shot, no time to poll: the data is in the page the server sent.
    root = parse(await run_chromium(tmp_path, "--dump-dom", base))
    body = next(n for n in root.walk() if n.tag == "body")
    assert body.attrs.get("data-state") == "live" and not body.attrs.get("data-polls")
    rows = {n.attrs.get("data-agent-id"): n for n in by_id(root, "agents").walk()
            if n.tag == "tr" and n.attrs.get("data-agent-id")}
    assert set(rows) == {"agent-1", long_id}
    assert "cpu_percent 37.5" in rows["agent-1"].text() and "queue_depth 2" in rows[
        "agent-1"].text()
    assert "connecting" not in by_id(root, "conn").text()
    tasks = {n.attrs.get("data-task-id"): n for n in by_id(root, "tasks").walk()
             if n.tag == "tr" and n.attrs.get("data-task-id")}
    assert "no agent of kind 'nosuchkind' is known" in tasks[waiting].text()
    assert not [n for n in root.walk() if n.attrs.get("id") == "first-state"]

    # At 800 px: no table wider than its card, no id broken over lines; Load explained.
    layout = await measure_layout(tmp_path, base, NARROW)
    assert layout.get("state") == "live", layout
    assert layout["page"] <= layout["window"], layout
    NARROW_ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    await run_chromium(tmp_path, f"--screenshot={NARROW_ARTIFACT}",
                       f"--window-size={NARROW[0]},{NARROW[1]}", base)
    for table in layout["tables"]:  # type: ignore[attr-defined]
        assert table["scroll"] <= table["client"], f"#{table['table']} is cut off: {table}"
    ids = layout["ids"]
    assert {i["text"] for i in ids} >= {"agent-1", long_id, waiting}  # type: ignore[attr-defined]
    for shown in ids:  # type: ignore[attr-defined]
        assert shown["height"] < 1.5 * shown["line"], f"id wraps: {shown}"
    legend = " ".join(str(layout["legend"]).split())
    assert "Load is what the agent itself last reported in its heartbeat" in legend
    assert "In flight is the coordinator's count: tasks it has assigned" in legend

    NARROW_ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    NARROW_ARTIFACT.unlink(missing_ok=True)
    await run_chromium(tmp_path, f"--screenshot={NARROW_ARTIFACT}",
                       f"--window-size={NARROW[0]},{NARROW[1]}", base)
    width, height, distinct = png_summary(NARROW_ARTIFACT.read_bytes())
    assert (width, height) == NARROW and distinct > 32


def test_the_first_state_cannot_end_its_block() -> None:
    """Agent strings inside the embedded JSON stay data: no ``</script>`` survives escaping."""
    import json as json_module

    from coordinator_agent.ops.statuspage import FIRST_STATE, embed_json, status_page

    hostile = {"output": "</script><script>alert(1)</script>", "amp": "a&b", "gt": ">"}
    embedded = embed_json(hostile)
    assert b"<" not in embedded and b">" not in embedded and b"&" not in embedded
    assert json_module.loads(embedded) == hostile
    body = status_page({"tasks": {"tasks": [hostile]}}).body
    assert isinstance(body, bytes)
    assert body.count(b"</script>") == 2  # the data block's own end and the page script's
    assert FIRST_STATE not in body
