"""ucxx-transport in a process that uses ucxx itself, in both orders.

ucxx allows one context per process. The application may initialise it first
(``ucxx.init()``, or just ``ucxx.create_listener``): our engine then shares that
context and its progress mode. Or our client comes first: the application's
ucxx calls then share ours. Either way neither side's teardown may cancel the
other's requests or reset the context under it. Each case runs in a fresh
subprocess (ucxx's context is per process).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(90)

#: the application's own ucxx use: a listener and an endpoint to it in this process; the
#: listener's handler keeps a receive posted, so a teardown that cancels every request on
#: the worker (or resets ucxx) under it shows as a lost message
USER_CODE = textwrap.dedent('''
    import asyncio, json, sys
    import numpy as np
    import shm
    from clients import TransportClient

    ORDER, UCXX_INIT = sys.argv[1], sys.argv[2]
    refs = [shm.SlotRef.from_dict(json.loads(x)) for x in sys.argv[3:]]

    async def echo_pair(ucxx):
        got = asyncio.Queue()

        async def handler(ep):
            buf = np.empty(5, np.uint8)
            try:
                while True:
                    await ep.recv(buf)
                    await got.put(buf.tobytes())
            except Exception as exc:
                await got.put(exc)

        lst = ucxx.create_listener(handler, 0)
        ep = await ucxx.create_endpoint("127.0.0.1", lst.port)
        return lst, ep, got

    async def say(ep, got, word):
        await ep.send(np.frombuffer(word, np.uint8))
        answer = await asyncio.wait_for(got.get(), 10)
        assert answer == word, answer
        print("user", word.decode(), flush=True)

    async def main():
        loop = asyncio.get_running_loop()
        if ORDER == "ucxx-first":
            import ucxx
            if UCXX_INIT != "lazy":
                ucxx.init(progress_mode=None if UCXX_INIT == "default" else UCXX_INIT)
            lst, ep, got = await echo_pair(ucxx)
            await say(ep, got, b"one__")
            client = TransportClient(local_fast_path=False)
            p = await client.afetch(refs[0])
            print("fetch", p.raw.tobytes().decode(), flush=True)
        else:
            client = TransportClient(local_fast_path=False)
            p = await loop.run_in_executor(None, client.fetch, refs[0])
            print("fetch", p.raw.tobytes().decode(), flush=True)
            import ucxx
            lst, ep, got = await echo_pair(ucxx)
            await say(ep, got, b"one__")
            p = await client.afetch(refs[1])
            print("fetch", p.raw.tobytes().decode(), flush=True)
        del p
        address = ucxx.get_worker_address().tobytes()  # what the application may have told its peers
        wbuf = np.zeros(5, np.uint8)
        posted = asyncio.ensure_future(ucxx.recv(wbuf, tag=0x5EED))  # a receive on the worker itself
        await asyncio.sleep(0.1)
        await loop.run_in_executor(None, client.close)  # both receives are still posted
        await say(ep, got, b"two__")
        await ep.send(np.frombuffer(b"three", np.uint8), tag=0x5EED, force_tag=True)
        await asyncio.wait_for(posted, 10)
        print("user", wbuf.tobytes().decode(), flush=True)
        assert ucxx.get_worker_address().tobytes() == address, "ucxx was reset under the application"
        await ep.close()
        lst.close()
        print("done", flush=True)

    asyncio.run(main())
''')


def run_user(tmp_path, refs, order, ucxx_init="lazy"):
    script = tmp_path / "user.py"
    script.write_text(USER_CODE)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("UCXPY_PROGRESS_MODE", None)
    proc = subprocess.run([sys.executable, str(script), order, ucxx_init, *(json.dumps(r.to_dict()) for r in refs)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return proc


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ucxx_init", ["lazy", "default", "polling", "blocking"])
def test_application_initialised_ucxx_first(make_ring, ring_name, serve, tmp_path, ucxx_init):
    """ucxx.init() (any mode) or a bare ucxx.create_listener before our client: no
    'UCX is already initiated'; the fetch works; the application's endpoint still
    works after our client closed (its posted receive was not cancelled)."""
    ring = make_ring()
    serve(ring_name, "--n-ports", "1")
    refs = [ring.put(b"first")]
    proc = run_user(tmp_path, refs, "ucxx-first", ucxx_init)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:5] == ["user one__", "fetch first", "user two__", "user three", "done"], proc.stdout
    assert "already initiated" not in proc.stderr
    assert "sharing its context" not in proc.stderr  # INFO, but the default logging level is WARNING


@pytest.mark.timeout(90)
def test_our_client_first_then_application_ucxx(make_ring, ring_name, serve, tmp_path):
    """Our client initialises ucxx; the application then uses ucxx's own API in its
    own loop (sharing our context); both keep working, and closing our client leaves
    the application's context (its worker address), progress and posted receives alone."""
    ring = make_ring()
    serve(ring_name, "--n-ports", "1")
    refs = [ring.put(b"first"), ring.put(b"secnd")]
    proc = run_user(tmp_path, refs, "client-first")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:6] == ["fetch first", "user one__", "fetch secnd", "user two__", "user three",
                                          "done"], \
        proc.stdout
