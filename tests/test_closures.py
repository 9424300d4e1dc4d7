"""`fedsim.closures.same_function`: equal code over equal captured values, and nothing else."""
from __future__ import annotations

import functools

import torch

from fedsim.closures import same_function
from fedsim.registry import STRATEGIES


def scaled(a):
    def f(x):
        return a * x

    return f


def nested(a, b):
    inner = scaled(a)

    def g(x):
        return inner(x) + b

    return g


def test_closures_over_equal_values_are_the_same_function():
    assert same_function(scaled(0.5), scaled(0.5))
    assert not same_function(scaled(0.5), scaled(0.25))
    assert not same_function(scaled(1), scaled(1.0))  # int vs float: not assumed equal
    assert same_function(nested(0.5, 1.0), nested(0.5, 1.0))
    assert not same_function(nested(0.5, 1.0), nested(0.25, 1.0))  # differs one closure down
    assert same_function(scaled(float("nan")), scaled(float("nan")))


def test_tensors_partials_and_other_code():
    assert same_function(scaled(torch.ones(3)), scaled(torch.ones(3)))
    assert not same_function(scaled(torch.ones(3)), scaled(torch.ones(4)))
    assert not same_function(scaled(torch.ones(3)), scaled(torch.ones(3, dtype=torch.float64)))
    assert not same_function(scaled(torch.ones(3)), scaled(torch.tensor([1.0, 1.0, 2.0])))
    assert same_function(functools.partial(max, 1), functools.partial(max, 1))
    assert not same_function(functools.partial(max, 1), functools.partial(max, 2))
    assert not same_function(lambda x: x, lambda x: x + 0)

    class Opaque:
        def __call__(self, x):
            return x

    assert not same_function(Opaque(), Opaque())  # unknown objects are different unless identical


def test_a_self_referencing_closure_terminates():
    def make(a):
        def f(n):
            return a if n == 0 else f(n - 1)

        return f

    assert same_function(make(2.0), make(2.0))
    assert not same_function(make(2.0), make(3.0))


def test_built_in_strategies_server_settings_leave_the_local_update_the_same():
    fedavg = STRATEGIES.get("fedavg").factory
    assert same_function(fedavg(server_lr=0.5).local, fedavg(server_lr=1.0, server_momentum=0.9).local)
    fedprox = STRATEGIES.get("fedprox").factory
    assert not same_function(fedprox(mu=0.01).local, fedprox(mu=0.1).local)
    assert same_function(fedprox(mu=0.01, server_lr=2.0).local, fedprox(mu=0.01).local)
    scaffold = STRATEGIES.get("scaffold").factory
    assert same_function(scaffold(server_lr=0.5).local, scaffold(server_lr=1.0).local)
    assert not same_function(scaffold(option="I").local, scaffold(option="II").local)


def test_lift_turns_captured_floats_into_inputs():
    from fedsim.closures import lift

    lifted = lift([nested(0.5, 1.0), nested(0.25, 1.0), nested(2.0, 1.0)])
    assert lifted.names == ("a",) and lifted.values == [(0.5,), (0.25,), (2.0,)]
    assert same_function(lifted.build([0.25]), nested(0.25, 1.0))
    template = lifted.build([torch.tensor([1.0, 3.0])])  # e.g. one value per client
    assert torch.equal(template(torch.tensor(2.0)), torch.tensor([3.0, 7.0]))
    assert lift([nested(0.5, 1.0), nested(0.5, 1.0)]) is None  # nothing to lift
    assert lift([scaled(0.5), scaled(1)]) is None  # an int is not lifted
    assert lift([scaled(0.5), nested(0.5, 1.0)]) is None  # other code
    fedprox = STRATEGIES.get("fedprox").factory
    lifted = lift([fedprox(mu=0.01).local, fedprox(mu=0.1).local])
    assert lifted.names == ("mu",) and same_function(lifted.build([0.1]), fedprox(mu=0.1).local)
