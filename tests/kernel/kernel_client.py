"""Helpers for the kernel tests: a kernel per test class through jupyter_client, and execute
requests collected with their iopub messages."""
import os

from jupyter_client.manager import start_new_kernel

KERNEL = os.environ.get("DIFFEXPLAINER_KERNEL_NAME", "diffexplainer-rust")


def start():
    """A fresh kernel with the library preloaded (the first cell waits for the preload)."""
    km, kc = start_new_kernel(kernel_name=KERNEL, startup_timeout=60)
    reply, _ = run(kc, "1", timeout=600)
    assert reply["content"]["status"] == "ok", reply
    return km, kc


def stop(km, kc):
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def shell_reply(kc, msg_id, timeout=120):
    """The shell reply to msg_id (other replies are skipped)."""
    while True:
        reply = kc.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def iopub_of(kc, msg_id, timeout=120):
    """The iopub messages of one request up to its idle status (statuses excluded)."""
    msgs = []
    while True:
        m = kc.get_iopub_msg(timeout=timeout)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "status":
            if m["content"]["execution_state"] == "idle":
                return msgs
            continue
        msgs.append(m)


def run(kc, code, timeout=120, **kwargs):
    """Executes code; returns (reply, [iopub messages of this request, excluding status])."""
    msg_id = kc.execute(code, **kwargs)
    reply = shell_reply(kc, msg_id, timeout)
    return reply, iopub_of(kc, msg_id, timeout)


def stream_text(msgs, name="stdout"):
    return "".join(
        m["content"]["text"]
        for m in msgs
        if m["msg_type"] == "stream" and m["content"]["name"] == name
    )


def of_type(msgs, msg_type):
    return [m for m in msgs if m["msg_type"] == msg_type]
