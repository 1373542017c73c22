"""Random API input never breaks the server or the store's rules."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vapora.app import create_app

from .conftest import AUTH, make_settings

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=10,
)
names = st.text(max_size=300)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "name": names | json_values,
        "steps": st.lists(names, max_size=5) | json_values,
        "message": names | json_values,
        "status": st.sampled_from(
            [
                "pending",
                "running",
                "waiting",
                "paused",
                "completed",
                "failed",
                "cancelled",
            ]
        )
        | json_values,
        "reopen": st.booleans() | json_values,
    },
)
actions = st.lists(
    st.tuples(
        st.sampled_from(["create", "advance", "status", "message", "reset"]), bodies
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=actions, raw=st.binary(max_size=64))
def test_random_api_input_never_gives_a_500_or_breaks_the_rules(
    tmp_path_factory: Any, script: list[tuple[str, dict[str, Any]]], raw: bytes
) -> None:
    asyncio.run(run_script(tmp_path_factory.mktemp("prop"), script, raw))


async def run_script(
    path: Path, script: list[tuple[str, dict[str, Any]]], raw: bytes
) -> None:
    client = TestClient(TestServer(create_app(make_settings(path))))
    await client.start_server()
    try:
        created = await client.post(
            "/api/workflows",
            json={"name": "base", "steps": ["a", "b", "c"]},
            headers=AUTH,
        )
        wid = (await created.json())["workflow_id"]
        garbage = await client.post(
            f"/api/workflows/{wid}/message", data=raw, headers=AUTH
        )
        assert garbage.status < 500
        step = 0
        for action, body in script:
            url = (
                "/api/workflows"
                if action == "create"
                else f"/api/workflows/{wid}/{action}"
            )
            response = await client.post(url, data=json.dumps(body), headers=AUTH)
            assert response.status < 500, (action, body, await response.text())
            if response.status >= 400:
                error = (await response.json())["error"]
                assert error["message"]
            state = await (await client.get(f"/api/workflows/{wid}")).json()
            if action != "reset" or response.status != 200:
                assert state["current_step"] >= step, "the step went back"
            step = state["current_step"]
        await check_rules(client)
    finally:
        await client.close()


async def check_rules(client: TestClient[Any, Any]) -> None:
    listing = await (await client.get("/api/workflows")).json()
    for workflow in listing["workflows"]:
        total = workflow["total_steps"]
        assert 0 <= workflow["current_step"] <= total
        assert total == len(workflow["steps"]) >= 1
        history = await (
            await client.get(f"/api/workflows/{workflow['workflow_id']}/history")
        ).json()
        seqs = [e["seq"] for e in history["events"]]
        assert seqs == list(range(workflow["seq"], 0, -1))
        running = [s for s in workflow["steps"] if s["state"] == "running"]
        assert len(running) <= 1
        if workflow["status"] == "completed":
            assert all(s["state"] in ("done", "skipped") for s in workflow["steps"])
