"""The Knative Functions entry point of the gradient function.

The Knative python runtime (func-python) imports ``function`` and calls ``new()`` for an instance with
``handle``/``start``/``stop``/``alive``/``ready``. The implementation lives in ``p2ptrain.gradient``
so the operator's Knative Service (``p2ptrain function``), the local runner and ``func deploy`` all
run the same code. Under ``func deploy`` func-python decodes events itself, so the request budget and
the per-reason refusals of ``p2ptrain.function_server.FunctionFront`` (docs/wire.md) apply only when served by
``p2ptrain function``.
"""

from p2ptrain.gradient import GradientFunction


def new() -> GradientFunction:
    return GradientFunction()
