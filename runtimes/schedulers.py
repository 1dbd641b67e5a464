"""Diffusion schedulers in numpy, driven by a diffusers `scheduler_config.json`: DDIM, Euler, DPM++ 2M and
PNDM (as Stable Diffusion 1.x configures it: PLMS steps only, `skip_prk_steps`).

Each follows the diffusers class of the same name step for step, in float32 where diffusers computes in
float32 (its schedules are torch float32 tensors), so a run from the same latents matches diffusers' own
(tests/runtimes/test_schedulers.py). A config written for one scheduler drives another as diffusers'
`from_config` does: the keys both take are shared, the rest take the new class's defaults.

One scheduler object runs one denoising loop: `timesteps`, then per step `scale_model_input` and `step`.
A key the config leaves out takes the class's default, as diffusers' `from_config` gives a key the config
file lacks (a pipeline built in memory also marks the keys it defaulted, `_use_default_values`, which its
saved config then spells out: engines follow the saved file).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from runtimes.errors import FeedError

# Keys every scheduler here takes, with diffusers' defaults; each class adds its own below.
_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0, "rescale_betas_zero_snr": False}
# Options of the diffusers classes that change the math and are not implemented here: (key, the value that is).
_UNSUPPORTED = {"thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
                "rescale_betas_zero_snr": False, "variance_type": None, "timestep_type": "discrete",
                "skip_prk_steps": True}


def _betas_for_alpha_bar(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' `betas_for_alpha_bar` with the cosine transform (`squaredcos_cap_v2`)."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
                    dtype=np.float32)


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` as torch's CPU kernel computes it: in float32,
    from the start for the first half and back from the end for the second."""
    first, last = np.float32(start), np.float32(end)
    step = (last - first) / np.float32(steps - 1)
    index = np.arange(steps, dtype=np.float32)
    return np.where(index < steps // 2, first + step * index, last - step * (np.float32(steps) - index - np.float32(1)))


class Scheduler:
    """What the loops share: the config (defaults filled in), betas and cumulative alphas in float32."""

    name = ""
    defaults: dict = {}

    def __init__(self, config: Mapping, source: str = "scheduler config"):
        taken = {**_COMMON, **self.defaults}
        self.config = {key: config.get(key, default) for key, default in taken.items()}
        for key, plain in _UNSUPPORTED.items():
            if key in taken and self.config.get(key, plain) != plain:
                raise FeedError(f"{source}: {key}={self.config[key]!r} is not implemented by the numpy {self.name} "
                                f"scheduler (it takes {key}={plain!r})")
        c = self.config
        steps = c["num_train_timesteps"]
        if c["trained_betas"] is not None:
            betas = np.asarray(c["trained_betas"], dtype=np.float32)
        elif c["beta_schedule"] == "linear":
            betas = _linspace32(c["beta_start"], c["beta_end"], steps)
        elif c["beta_schedule"] == "scaled_linear":
            betas = _linspace32(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, steps) ** np.float32(2)
        elif c["beta_schedule"] == "squaredcos_cap_v2":
            betas = _betas_for_alpha_bar(steps)
        else:
            raise FeedError(f"{source}: beta_schedule {c['beta_schedule']!r} is not one of linear, scaled_linear, "
                            "squaredcos_cap_v2")
        # torch's CPU cumprod multiplies float32 in double and rounds each product: so does this.
        self.alphas_cumprod = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
        self.source = source
        self.init_noise_sigma = np.float32(1.0)
        self.timesteps = np.zeros(0)

    @property
    def final_alpha_cumprod(self) -> np.float32:
        """The alpha after the last step (DDIM, PNDM): 1 with `set_alpha_to_one`, else the first timestep's."""
        return np.float32(1.0) if self.config.get("set_alpha_to_one") else self.alphas_cumprod[0]

    def spacing_error(self) -> FeedError:
        return FeedError(f"{self.source}: timestep_spacing {self.config['timestep_spacing']!r} is not one of "
                         "linspace, leading, trailing")

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """The sample one step less noisy, after `timesteps[index]`."""
        raise NotImplementedError


class DDIM(Scheduler):
    """diffusers' DDIMScheduler with eta 0 (deterministic)."""

    name = "ddim"
    defaults = {"clip_sample": True, "set_alpha_to_one": True, "clip_sample_range": 1.0, "thresholding": False,
                "timestep_spacing": "leading"}

    def set_timesteps(self, steps: int) -> None:
        c = self.config
        train = c["num_train_timesteps"]
        if c["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, train - 1, steps).round()[::-1].astype(np.int64)
        elif c["timestep_spacing"] == "leading":
            timesteps = (np.arange(0, steps) * (train // steps)).round()[::-1].astype(np.int64) + c["steps_offset"]
        elif c["timestep_spacing"] == "trailing":
            timesteps = np.round(np.arange(train, 0, -train / steps)).astype(np.int64) - 1
        else:
            raise self.spacing_error()
        self.timesteps = timesteps
        self.steps = steps

    def step(self, model_output, index, sample):
        c = self.config
        t = int(self.timesteps[index])
        prev = t - c["num_train_timesteps"] // self.steps
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        beta = np.float32(1) - alpha
        kind = c["prediction_type"]
        if kind == "epsilon":
            original = (sample - beta ** np.float32(0.5) * model_output) / alpha ** np.float32(0.5)
            epsilon = model_output
        elif kind == "sample":
            original = model_output
            epsilon = (sample - alpha ** np.float32(0.5) * original) / beta ** np.float32(0.5)
        elif kind == "v_prediction":
            original = alpha ** np.float32(0.5) * sample - beta ** np.float32(0.5) * model_output
            epsilon = alpha ** np.float32(0.5) * model_output + beta ** np.float32(0.5) * sample
        else:
            raise _prediction_error(self, ("epsilon", "sample", "v_prediction"))
        if c["clip_sample"]:
            bound = np.float32(c["clip_sample_range"])
            original = np.clip(original, -bound, bound)
        direction = (np.float32(1) - alpha_prev) ** np.float32(0.5) * epsilon
        return (alpha_prev ** np.float32(0.5) * original + direction).astype(np.float32)


def _sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    return ((np.float32(1) - alphas_cumprod) / alphas_cumprod) ** np.float32(0.5)


class Euler(Scheduler):
    """diffusers' EulerDiscreteScheduler without churn (s_churn 0): deterministic."""

    name = "euler"
    defaults = {"interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False, "timestep_spacing": "linspace", "timestep_type": "discrete",
                "final_sigmas_type": "zero"}

    def set_timesteps(self, steps: int) -> None:
        c = self.config
        train = c["num_train_timesteps"]
        if c["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, train - 1, steps, dtype=np.float32)[::-1].copy()
        elif c["timestep_spacing"] == "leading":
            timesteps = (np.arange(0, steps) * (train // steps)).round()[::-1].astype(np.float32) + c["steps_offset"]
        elif c["timestep_spacing"] == "trailing":
            timesteps = np.arange(train, 0, -train / steps).round().astype(np.float32) - 1
        else:
            raise self.spacing_error()
        sigmas = _sigmas(self.alphas_cumprod)
        if c["interpolation_type"] == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        elif c["interpolation_type"] == "log_linear":
            sigmas = np.exp(np.linspace(np.log(sigmas[-1]), np.log(sigmas[0]), steps + 1, dtype=np.float32))
        else:
            raise FeedError(f"{self.source}: interpolation_type {c['interpolation_type']!r} is not one of linear, log_linear")
        last = _final_sigma(self)
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        largest = self.sigmas.max()
        self.init_noise_sigma = largest if c["timestep_spacing"] in ("linspace", "trailing") else \
            (largest ** np.float32(2) + np.float32(1)) ** np.float32(0.5)

    def scale_model_input(self, sample, index):
        sigma = self.sigmas[index]
        return sample / ((sigma ** np.float32(2) + np.float32(1)) ** np.float32(0.5))

    def step(self, model_output, index, sample):
        sigma = self.sigmas[index]
        kind = self.config["prediction_type"]
        if kind in ("original_sample", "sample"):
            original = model_output
        elif kind == "epsilon":
            original = sample - sigma * model_output
        elif kind == "v_prediction":
            original = model_output * (-sigma / (sigma ** np.float32(2) + np.float32(1)) ** np.float32(0.5)) + \
                sample / (sigma ** np.float32(2) + np.float32(1))
        else:
            raise _prediction_error(self, ("epsilon", "sample", "v_prediction"))
        derivative = (sample - original) / sigma
        return (sample + derivative * (self.sigmas[index + 1] - sigma)).astype(np.float32)


def _final_sigma(scheduler: Scheduler) -> np.float32:
    kind = scheduler.config["final_sigmas_type"]
    if kind == "zero":
        return np.float32(0)
    if kind == "sigma_min":
        return _sigmas(scheduler.alphas_cumprod[:1])[0]
    raise FeedError(f"{scheduler.source}: final_sigmas_type {kind!r} is not one of zero, sigma_min")


class DPMSolverMultistep(Scheduler):
    """diffusers' DPMSolverMultistepScheduler as DPM++ 2M: `dpmsolver++`, order 2 (or 1), midpoint or heun."""

    name = "dpm++2m"
    defaults = {"solver_order": 2, "thresholding": False, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
                "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
                "use_flow_sigmas": False, "final_sigmas_type": "zero", "lambda_min_clipped": -float("inf"),
                "variance_type": None, "timestep_spacing": "linspace"}

    def __init__(self, config: Mapping, source: str = "scheduler config"):
        super().__init__(config, source)
        c = self.config
        # diffusers maps DEIS's names to its own, as its __init__ does.
        c["algorithm_type"] = "dpmsolver++" if c["algorithm_type"] == "deis" else c["algorithm_type"]
        c["solver_type"] = "midpoint" if c["solver_type"] in ("logrho", "bh1", "bh2") else c["solver_type"]
        if c["algorithm_type"] != "dpmsolver++" or c["solver_order"] not in (1, 2) or c["solver_type"] not in ("midpoint", "heun"):
            raise FeedError(f"{source}: the numpy DPM++ 2M scheduler takes algorithm_type 'dpmsolver++', solver_order 1 "
                            f"or 2 and solver_type midpoint or heun; got {c['algorithm_type']!r}, {c['solver_order']}, "
                            f"{c['solver_type']!r}")
        alpha = np.sqrt(self.alphas_cumprod)
        sigma = np.sqrt(np.float32(1) - self.alphas_cumprod)
        self.lambda_t = np.log(alpha) - np.log(sigma)

    def set_timesteps(self, steps: int) -> None:
        c = self.config
        train = c["num_train_timesteps"]
        clipped = int(np.searchsorted(self.lambda_t[::-1], c["lambda_min_clipped"]))
        last = train - clipped
        if c["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif c["timestep_spacing"] == "leading":
            ratio = last // (steps + 1)
            timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + c["steps_offset"]
        elif c["timestep_spacing"] == "trailing":
            timesteps = np.arange(last, 0, -train / steps).round().astype(np.int64) - 1
        else:
            raise self.spacing_error()
        sigmas = np.interp(timesteps, np.arange(0, len(self.alphas_cumprod)), _sigmas(self.alphas_cumprod))
        self.sigmas = np.concatenate([sigmas, [_final_sigma(self)]]).astype(np.float32)
        self.timesteps = timesteps
        self.outputs: list[np.ndarray] = []

    @staticmethod
    def _alpha_sigma(sigma):
        alpha = np.float32(1) / (sigma ** np.float32(2) + np.float32(1)) ** np.float32(0.5)
        return alpha, sigma * alpha

    def step(self, model_output, index, sample):
        c = self.config
        count = len(self.timesteps)
        last = index == count - 1
        lower_final = last and (c["euler_at_final"] or (c["lower_order_final"] and count < 15)
                                or c["final_sigmas_type"] == "zero")
        kind = c["prediction_type"]
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[index])
        if kind == "epsilon":
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        elif kind == "sample":
            x0 = model_output
        elif kind == "v_prediction":
            x0 = alpha_s0 * sample - sigma_s0 * model_output
        else:
            raise _prediction_error(self, ("epsilon", "sample", "v_prediction"))
        self.outputs = (self.outputs + [x0])[-2:]
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index + 1])
        with np.errstate(divide="ignore"):  # the last sigma may be 0: lambda is +inf and exp(-h) 0, as in diffusers
            lambda_t = np.log(alpha_t) - np.log(sigma_t)
        lambda_s0 = np.log(alpha_s0) - np.log(sigma_s0)
        h = lambda_t - lambda_s0
        first_order = c["solver_order"] == 1 or len(self.outputs) < 2 or lower_final
        if first_order:
            out = (sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - np.float32(1))) * x0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[index - 1])
            lambda_s1 = np.log(alpha_s1) - np.log(sigma_s1)
            m0, m1 = self.outputs[-1], self.outputs[-2]
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = (np.float32(1) / r0) * (m0 - m1)
            decay = alpha_t * (np.exp(-h) - np.float32(1))
            if c["solver_type"] == "midpoint":
                out = (sigma_t / sigma_s0) * sample - decay * m0 - np.float32(0.5) * decay * d1
            else:
                out = (sigma_t / sigma_s0) * sample - decay * m0 + \
                    (alpha_t * ((np.exp(-h) - np.float32(1)) / h + np.float32(1))) * d1
        return out.astype(np.float32)


class PNDM(Scheduler):
    """diffusers' PNDMScheduler with `skip_prk_steps` (Stable Diffusion 1.x's): linear multistep (PLMS) steps, the
    second timestep run twice to start the history."""

    name = "pndm"
    defaults = {"skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"}

    def set_timesteps(self, steps: int) -> None:
        c = self.config
        train = c["num_train_timesteps"]
        if c["timestep_spacing"] == "linspace":
            spaced = np.linspace(0, train - 1, steps).round().astype(np.int64)
        elif c["timestep_spacing"] == "leading":
            spaced = (np.arange(0, steps) * (train // steps)).round() + c["steps_offset"]
        elif c["timestep_spacing"] == "trailing":
            spaced = np.round(np.arange(train, 0, -train / steps))[::-1].astype(np.int64) - 1
        else:
            raise self.spacing_error()
        self.timesteps = np.concatenate([spaced[:-1], spaced[-2:-1], spaced[-1:]])[::-1].astype(np.int64)
        self.steps = steps
        self.history: list[np.ndarray] = []
        self.first_sample = None

    def step(self, model_output, index, sample):
        c = self.config
        stride = c["num_train_timesteps"] // self.steps
        t = int(self.timesteps[index])
        prev = t - stride
        if index != 1:
            self.history = (self.history + [model_output])[-4:]
        else:  # the repeated timestep: step again from the first sample with the two outputs averaged
            prev, t = t, t + stride
        ets = self.history
        if len(ets) == 1 and index == 0:
            self.first_sample = sample
        elif len(ets) == 1 and index == 1:
            model_output = (model_output + ets[-1]) / 2
            sample = self.first_sample
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        beta, beta_prev = np.float32(1) - alpha, np.float32(1) - alpha_prev
        if c["prediction_type"] == "v_prediction":
            model_output = alpha ** np.float32(0.5) * model_output + beta ** np.float32(0.5) * sample
        elif c["prediction_type"] != "epsilon":
            raise _prediction_error(self, ("epsilon", "v_prediction"))
        denominator = alpha * beta_prev ** np.float32(0.5) + (alpha * beta * alpha_prev) ** np.float32(0.5)
        out = (alpha_prev / alpha) ** np.float32(0.5) * sample - (alpha_prev - alpha) * model_output / denominator
        return out.astype(np.float32)


def _prediction_error(scheduler: Scheduler, allowed: tuple[str, ...]) -> FeedError:
    return FeedError(f"{scheduler.source}: prediction_type {scheduler.config['prediction_type']!r} is not one of "
                     + ", ".join(allowed))


# The name `generate_image(scheduler=...)` takes -> the class; the diffusers class a config names -> that name.
SCHEDULERS = {s.name: s for s in (DDIM, Euler, DPMSolverMultistep, PNDM)}
DIFFUSERS_NAMES = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler", "DPMSolverMultistepScheduler": "dpm++2m",
                   "PNDMScheduler": "pndm"}


def scheduler_for(config: Mapping, name: str | None = None, source: str = "scheduler config") -> Scheduler:
    """The scheduler `name` (None: the one `config`'s `_class_name` names) built from `config`."""
    if name is None:
        named = config.get("_class_name")
        if named not in DIFFUSERS_NAMES:
            raise FeedError(f"{source}: the engine's scheduler is {named}, which has no numpy version here; pass "
                            f"scheduler= one of {', '.join(SCHEDULERS)}")
        name = DIFFUSERS_NAMES[named]
    if name not in SCHEDULERS:
        raise FeedError(f"scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](config, source)
