"""The optimizer zoo under test: name -> (class, [configurations]).  Each configuration is the
constructor's keyword arguments (besides ``backend``); the tests run every configuration on every
backend against the torch reference.  Add a new elementwise optimizer here."""
import fastopt

ZOO = {
    "lion": (fastopt.Lion, [
        dict(lr=1e-2, weight_decay=0.1),
        dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1, weight_decouple=False),
        dict(lr=3e-3, weight_decay=0.05, fixed_decay=True, maximize=True),
    ]),
}

STATE_KEYS = {name: cls.STATE_NAMES for name, (cls, _) in ZOO.items()}
