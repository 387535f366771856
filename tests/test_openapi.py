"""GET /openapi.json: a valid OpenAPI 3.1 document that describes exactly the routes the
control plane serves, with the shapes its answers really have."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from tests.conftest import AgentFactory, ControlPlane, png_bytes
from tests.test_e2e import WORKFLOW, submit


async def spec_of(cp: ControlPlane) -> dict[str, Any]:
    status, spec = await cp.request("GET", "/openapi.json", account=None)
    assert status == 200
    return spec


def check(spec: dict[str, Any], name: str, instance: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    errors = sorted(Draft202012Validator(schema).iter_errors(instance), key=str)
    assert errors == [], [e.message for e in errors]


async def test_the_document_is_valid_and_describes_every_route(cp: ControlPlane) -> None:
    spec = await spec_of(cp)
    validate(spec)
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in cp.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    described = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert served == described


async def test_answers_have_the_documented_shapes(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    spec = await spec_of(cp)
    runner = await cp.create_runner()
    check(spec, "Runner", runner)
    await start_agent(cp.base, runner["token"], sim)
    wf = await submit(cp, WORKFLOW, **{"$prompt": "p", "$input_image": png_bytes((1, 2, 3))})
    check(spec, "Workflow", wf)
    done = await cp.wait_for_status(wf["id"], {"completed", "failed"})
    check(spec, "Workflow", done)
    _, outputs = await cp.request("GET", f"/v1/workflow/{wf['id']}/outputs")
    for output in outputs["outputs"]:
        check(spec, "Output", output)
    _, tasks = await cp.request("GET", f"/v1/workflow/{wf['id']}/tasks")
    check(spec, "TaskList", tasks)
    _, engine = await cp.request("GET", f"/api/workflow/{wf['id']}")
    check(spec, "ConductorWorkflow", engine)
    status, error = await cp.request("GET", "/v1/workflow/nope")
    assert status == 404
    check(spec, "Error", error)
