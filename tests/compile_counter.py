"""CompileCounter: counts XLA compilations per jitted function while active (for no-recompile
tests). Shared by the test suite and tests/sharding_worker.py (which runs as a script)."""

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA compilations per jitted function name while active."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def __call__(self, event, duration, **kwargs):
        if event == COMPILE_EVENT:
            name = kwargs.get("fun_name", "?")
            self.counts[name] = self.counts.get(name, 0) + 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)
