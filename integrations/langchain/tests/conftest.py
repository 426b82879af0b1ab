import inspect

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """LangChain's standard async tests expect pytest-asyncio's auto mode, but the rest of the
    project runs async tests under anyio (asyncio and trio). This conftest's collection hook
    applies to this folder only: mark its coroutine tests for pytest-asyncio before it collects."""
    if name.startswith("test_") and inspect.iscoroutinefunction(obj):
        pytest.mark.asyncio(obj)
