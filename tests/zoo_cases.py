"""The optimizer zoo under test: name -> (class, [configurations]).  Each configuration is the
constructor's keyword arguments (besides ``backend``); the tests run every configuration on every
backend against the torch reference.  Add a new elementwise optimizer here."""
import fastopt


class _AdaHessianGiven(fastopt.AdaHessian):
    """AdaHessian stepped with estimates of its own at the steps that take one (``step(hessian=...)``,
    pytorch_optimizer's API): the zoo's tests set gradients without a graph.  The estimate is a fixed
    function of the gradient, |g| / 2 + 0.1, so every backend steps with the same one; the double
    backward and the probes are tests/test_adahessian.py's."""

    _listed = False

    def step(self, closure=None, hessian=None):
        first = self.param_groups[0]
        if hessian is None and int(first.get("step", 0)) % first["update_period"] == 0:
            unscale = getattr(self, "grad_scale", None)
            unscale = 1.0 if unscale is None else unscale.float()  # (|g| / 2 + 0.1 of the unscaled gradient)
            hessian = [(p.grad.float() / unscale).abs() * 0.5 + 0.1 if p.grad is not None
                       else p.detach().float() * 0 for g in self.param_groups for p in g["params"]]
        return super().step(closure, hessian=hessian)


ZOO = {
    # the fused update (the adahessian op; adahessian_plain at the steps between two estimates)
    "adahessian": (_AdaHessianGiven, [
        dict(lr=1e-2, weight_decay=0.01),
        dict(lr=1e-2, weight_decay=0.01, weight_decouple=False, hessian_power=0.5, update_period=2),
        dict(lr=1e-2, mode="official", weight_decay=0.1, fixed_decay=True, maximize=True),
    ]),
    "lion": (fastopt.Lion, [
        dict(lr=1e-2, weight_decay=0.1),
        dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1, weight_decouple=False),
        dict(lr=3e-3, weight_decay=0.05, fixed_decay=True, maximize=True),
        # the options with reduce passes: gradient centralization, the cautious mask, both
        dict(lr=1e-2, weight_decay=0.1, use_gc=True),
        dict(lr=1e-2, weight_decay=0.1, cautious=True),
        dict(lr=3e-3, weight_decay=0.1, weight_decouple=False, use_gc=True, cautious=True, maximize=True),
    ]),
    "adan": (fastopt.Adan, [
        dict(lr=1e-2, weight_decay=0.02),
        dict(lr=1e-2, weight_decay=0.02, weight_decouple=True, betas=(0.9, 0.9, 0.95)),
        dict(lr=1e-3, maximize=True),
        dict(lr=1e-2, weight_decay=0.02, use_gc=True),
    ]),
    "adabelief": (fastopt.AdaBelief, [
        dict(lr=1e-2, weight_decay=0.01),
        dict(lr=1e-2, weight_decay=0.01, weight_decouple=False, ams_bound=True),
        dict(lr=1e-2, rectify=True, n_sma_threshold=4, betas=(0.9, 0.9)),
        dict(lr=1e-2, rectify=True, degenerated_to_sgd=False, fixed_decay=True, weight_decay=0.1),
        dict(lr=1e-2, adam_debias=True, eps=1e-8),
    ]),
    "diffgrad": (fastopt.DiffGrad, [
        dict(lr=1e-2, weight_decay=0.01),
        dict(lr=1e-2, weight_decay=0.01, weight_decouple=False, ams_bound=True),
        dict(lr=1e-2, rectify=True, betas=(0.9, 0.8)),
        dict(lr=1e-2, adam_debias=True, maximize=True),
    ]),
    "exadam": (fastopt.EXAdam, [
        dict(lr=1e-2, weight_decay=0.01),
        dict(lr=1e-2, weight_decay=0.01, weight_decouple=False, eps=1e-6),
    ]),
    "lamb": (fastopt.Lamb, [
        dict(lr=1e-2, weight_decay=0.01),
        dict(lr=1e-2, weight_decay=0.01, weight_decouple=False, grad_averaging=False),
        dict(lr=1e-2, pre_norm=True, max_grad_norm=0.5, adam_debias=True, clamp=2.0),
        dict(lr=1e-2, adam=True, fixed_decay=True, weight_decay=0.1, maximize=True),
    ]),
    "sgdsai": (fastopt.SGDSaI, [
        dict(lr=1e-2),
        dict(lr=1e-2, momentum=0.0, weight_decouple=False, weight_decay=0.05),
        dict(lr=1e-2, momentum=0.3, maximize=True),
    ]),
    "adamp": (fastopt.AdamP, [
        dict(lr=1e-2, weight_decay=0.01),
        dict(lr=1e-2, weight_decay=0.01, nesterov=True, fixed_decay=True, delta=0.5),
        dict(lr=1e-2, adam_debias=True, maximize=True, wd_ratio=0.5, weight_decay=0.1),
        dict(lr=1e-2, weight_decay=0.01, use_gc=True, nesterov=True),
        dict(lr=1e-2, weight_decay=0.01, cautious=True, nesterov=True, delta=0.5),
        dict(lr=1e-2, weight_decay=0.01, cautious=True, maximize=True),
    ]),
    "sgdp": (fastopt.SGDP, [
        dict(lr=1e-2, momentum=0.9, weight_decay=0.01),
        dict(lr=1e-2, momentum=0.9, dampening=0.1, nesterov=True, weight_decay=0.01, delta=0.5),
        dict(lr=1e-2, maximize=True, weight_decay=0.1, fixed_decay=True),
    ]),
    # torch.optim's SGD / Adagrad / RMSprop (tests/test_classic.py checks them against torch.optim)
    "sgd": (fastopt.SGD, [
        dict(lr=1e-2, momentum=0.9, weight_decay=0.01),
        dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.05, maximize=True),
        dict(lr=1e-2, momentum=0.9, nesterov=True),
        dict(lr=1e-2, weight_decay=0.1),
    ]),
    "adagrad": (fastopt.Adagrad, [
        dict(lr=1e-2, weight_decay=0.01),
        dict(lr=1e-2, lr_decay=0.05, initial_accumulator_value=0.1, eps=1e-6, maximize=True),
    ]),
    "rmsprop": (fastopt.RMSprop, [
        dict(lr=1e-3, weight_decay=0.01),
        # momentum_buffer sums g / (sqrt(v) + eps), of size 1 / sqrt(1 - alpha) at the first step: torch's
        # sqrt (the references') is not always correctly rounded, so a small alpha keeps its one-ulp
        # differences within the zoo's atol (tests/test_classic.py: the default alpha, scaled tolerance)
        dict(lr=1e-3, momentum=0.9, alpha=0.5),
        dict(lr=1e-3, centered=True, weight_decay=0.01),
        dict(lr=1e-3, centered=True, momentum=0.5, alpha=0.5, maximize=True),
    ]),
}

# Optimizers whose step reduces over a tensor (sums in a backend-dependent order).
REDUCING = {"lamb", "adamp", "sgdp"}

STATE_KEYS = {name: cls.STATE_NAMES for name, (cls, _) in ZOO.items()}
