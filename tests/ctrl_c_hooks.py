"""Hooks the Ctrl-C tests' trainer subprocesses install (imported there, never by the library)."""

import asyncio
import os
import signal


def ctrl_c_while_settling():
    """From now on, settling a held delivery that consumes something first sends this process a
    real SIGINT and lingers 0.3 s (the caller is interrupted while its ACK is on its way);
    returns a function that undoes it."""
    from clients import held

    real_settle = held.HeldDelivery.settle

    async def settle_after_a_ctrl_c(self, k):
        if k:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(0.3)
        return await real_settle(self, k)

    held.HeldDelivery.settle = settle_after_a_ctrl_c

    def undo():
        held.HeldDelivery.settle = real_settle
    return undo
