"""The real OpenCode CLI through the gateway to a DeepSeek-thinking-like simulator that
refuses an assistant message without `reasoning_content` (tests/simulators.py): a
multi-turn tool-call loop (tool call, tool result, answer) works with the deepseek preset.
How OpenCode is installed and driven: test_opencode_e2e.py."""

import json

from conftest import channel, config
from simulators import DeepSeek
from test_opencode_e2e import chat_flows, opencode, run_opencode  # noqa: F401 (fixtures)

THOUGHT = "The user wants the magic word; I should read notes.txt first."
MISSING = "Missing `reasoning_content` field in the assistant message at message index 4"


def test_tool_call_loop_with_a_thinking_model_that_needs_reasoning_back(gateway, upstreams, run_opencode):  # noqa: F811
    """Two tool calls, then the answer. DeepSeek streams reasoning with the first call and
    none with the second (it does that: providers.md, I13), so OpenCode sends the second
    assistant message back without `reasoning_content`, which thinking mode refuses."""
    notes = run_opencode.work / "notes.txt"
    notes.write_text("the magic word is xyzzy-4411\n")
    more = run_opencode.work / "more.txt"
    more.write_text("and the second word is plugh-2377\n")
    plan = [("read", json.dumps({"filePath": str(notes)}), THOUGHT), ("read", json.dumps({"filePath": str(more)}), "")]

    plain_simulator = DeepSeek(plan=plan, reasoning="Done.")
    plain_up = upstreams(plain_simulator)
    plain = gateway(config(channel("deepseek", plain_up.url + "/v1", extra="model_mapping: {gpt: deepseek-reasoner}")))
    failed = run_opencode(plain.url)
    assert run_error_text(failed) and MISSING in run_error_text(failed), failed
    assert len(plain_simulator.refused) == 1 and failed.text == "", failed

    simulator = DeepSeek(plan=plan, reasoning="Done.")
    up = upstreams(simulator)
    gw = gateway(config(channel("deepseek", up.url + "/v1",
                                extra="preset: deepseek\nmodel_mapping: {gpt: deepseek-reasoner}")))

    run = run_opencode(gw.url)

    assert run.returncode == 0, run
    assert not run.of_type("error"), run
    tools = run.of_type("tool_use")
    assert [t["part"]["tool"] for t in tools] == ["read", "read"], run
    assert all(t["part"]["state"]["status"] == "completed" for t in tools), [t["part"]["state"] for t in tools]
    assert "xyzzy-4411" in tools[0]["part"]["state"]["output"]
    assert "plugh-2377" in tools[1]["part"]["state"]["output"]
    assert run.text == "answer from deepseek", run
    assert [e["part"]["reason"] for e in run.of_type("step_finish")] == ["tool-calls", "tool-calls", "stop"], run

    assert not simulator.refused, simulator.refused
    last = up.chats[-1].json["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    first_call, second_call = last[2], last[4]
    assert first_call["reasoning_content"] == simulator.sent_reasoning[first_call["tool_calls"][0]["id"]] == THOUGHT
    assert second_call["reasoning_content"] == " "  # DeepSeek sent none: the placeholder
    flows = chat_flows(gw)
    assert [f.response.status_code for f in flows] == [200, 200, 200]
    assert "fixes: +reasoning_content×1 (1 placeholder)" in flows[2].comment, flows[2].comment


def run_error_text(run) -> str:
    return " ".join(json.dumps(e.get("error")) for e in run.of_type("error"))
