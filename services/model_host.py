"""The one model of a server process, loaded (and warmed) once, and the lock that serialises its use.

The host also knows where the model is in its life (`state`: not loaded, loading, ready, failed, with the
error of a failed load) and tells listeners of every change: the server's health and ServerInfo derive
from it, so a stage reports NOT_SERVING until its model can really run (see services/server_info.py).

Why a lock: the library installs attention processors and forward hooks on the shared UNet for the
duration of an edit, and a GPU runs one heavy job well rather than three badly. So every stage holds
`ModelHost.lock` (through `ModelHost.use`) while it runs the UNet or the VAE; two stages hosted in one
process never run model code at the same time. A job waiting for the lock stays cancellable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from tokenflow.errors import ModelError
from tokenflow.threads import release_openmp_team

if TYPE_CHECKING:  # torch is imported only when a model is actually loaded
    from tokenflow.models import Model

log = logging.getLogger(__name__)

PRESETS: tuple[str, ...] = ("tiny", "sd15-arch", "sd21-arch")
"""Random-weight presets (mirrors tokenflow.models.PRESETS without importing torch)."""
_LOCK_POLL_SECONDS = 0.2
RELOAD_SECONDS = 30.0
"""After a failed background load, try again this often (an operator may mount the missing volume)."""

NOT_LOADED, LOADING, READY, FAILED = "not_loaded", "loading", "ready", "failed"
STATES = (NOT_LOADED, LOADING, READY, FAILED)


class ModelHost:
    """Loads `model_name` once on first use and hands it out under one lock.

    `loader` defaults to `tokenflow.models.load_model`; tests may pass another.
    """

    def __init__(
        self,
        model_name: str,
        device: str | None = None,
        dtype: str | None = None,
        loader: Callable[..., Model] | None = None,
    ) -> None:
        self.model_name = model_name
        self.device = device
        self.dtype = dtype
        self.lock = threading.Lock()
        """Held by whichever stage is running the UNet/VAE right now."""
        self._loader = loader
        self._load_lock = threading.Lock()
        self._model: Model | None = None
        self._state_lock = threading.Lock()
        self._state = NOT_LOADED
        self._error = ""
        self._listeners: list[Callable[[str, str], None]] = []
        self._stop = threading.Event()

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """One of NOT_LOADED, LOADING, READY, FAILED."""
        return self._state

    @property
    def error(self) -> str:
        """Why the last load failed ("" unless `state` is FAILED)."""
        return self._error

    def add_listener(self, listener: Callable[[str, str], None]) -> None:
        """Call `listener(state, error)` now and on every state change (from the loading thread)."""
        with self._state_lock:
            self._listeners.append(listener)
            state, error = self._state, self._error
        listener(state, error)

    def _set_state(self, state: str, error: str = "") -> None:
        with self._state_lock:
            self._state, self._error = state, error
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(state, error)
            except Exception:  # noqa: BLE001 - a listener must not break loading
                log.exception("model state listener failed")

    # -- loading -------------------------------------------------------------------------------------------

    def get(self) -> Model:
        """The loaded model, loading it now if needed. Raises ModelError (FAILED_PRECONDITION).

        A failed load is not remembered: an operator who mounts the missing volume need not restart us.
        """
        model = self._model
        if model is not None:
            return model
        with self._load_lock:
            if self._model is None:
                self._set_state(LOADING)
                try:
                    model = self._load()
                except ModelError as e:
                    self._set_state(FAILED, str(e))
                    raise
                finally:  # the loading thread may be a long-lived gRPC handler: park no OpenMP team there
                    release_openmp_team()
                self._model = model
                self._set_state(READY)
            return self._model

    def _load(self) -> Model:
        loader = self._loader
        if loader is None:
            from tokenflow.models import load_model

            loader = load_model
        started = time.monotonic()
        log.info("loading model %s (device=%s, dtype=%s)", self.model_name, self.device, self.dtype)
        try:
            model = loader(self.model_name, device=self.device, dtype=self.dtype)
        except ModelError as e:
            raise ModelError(f"{e}. {self._hint()}") from e
        except Exception as e:  # bad config files, CUDA not available, out of memory, ...
            raise ModelError(f"cannot load the model {self.model_name!r}: {e}. {self._hint()}") from e
        try:
            warm_model(model)
        except Exception as e:  # the weights loaded but cannot run here (device, dtype, memory)
            message = f"the model {self.model_name!r} loaded but cannot run: {e}. {self._hint()}"
            raise ModelError(message) from e
        log.info(
            "model %s loaded in %.1f s (fingerprint %s%s)",
            self.model_name,
            time.monotonic() - started,
            model.fingerprint[:12],
            ", TEST MODEL: outputs are noise" if model.is_test_model else "",
        )
        return model

    def _hint(self) -> str:
        return (
            "Start the server with --model pointing at a local diffusers Stable Diffusion folder "
            f"(unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a preset ({', '.join(PRESETS)}), "
            "and --device/--dtype the machine supports"
        )

    def warm_up(self) -> bool:
        """Load and warm now (e.g. from a start-up thread); log instead of raising. True if ready."""
        try:
            self.get()
        except ModelError as e:
            log.error("model not available: %s", e)
            return False
        return True

    def load_in_background(self, retry_seconds: float = RELOAD_SECONDS) -> threading.Thread:
        """Load and warm in a daemon thread, retrying a failed load every `retry_seconds` until `close`."""

        def run() -> None:
            while not self.warm_up() and not self._stop.wait(retry_seconds):
                log.info("retrying to load the model %s", self.model_name)

        with self._load_lock:
            if self._model is None:
                self._set_state(LOADING)  # at once, so nothing reports ready before the thread starts
        thread = threading.Thread(target=run, name="model-load", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop background retries (a load in progress finishes)."""
        self._stop.set()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def fingerprint(self) -> str:
        """The model's content fingerprint (part of every artifact key); loads the model on first use."""
        return self.get().fingerprint

    @property
    def is_test_model(self) -> bool:
        """True for the random-weight presets, whose pictures are noise. Known without loading."""
        return self._model.is_test_model if self._model is not None else self.model_name in PRESETS

    # -- use -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(
        self,
        check_cancelled: Callable[[], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> Iterator[Model]:
        """Hold the model lock inside the block and yield the model.

        While another stage holds the lock, `check_cancelled` is called every 0.2 s (so a cancelled or
        abandoned job stops waiting) and `on_wait` once (to tell the caller why nothing moves).
        """
        model = self.get()
        waited = False
        while not self.lock.acquire(timeout=_LOCK_POLL_SECONDS):
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            if check_cancelled is not None:
                check_cancelled()
        try:
            if check_cancelled is not None:
                check_cancelled()
            yield model
        finally:
            try:
                _release_accelerator_memory(model)
            finally:
                self.lock.release()


def warm_model(model: Model) -> None:
    """Run the text encoder and one UNet step on a tiny latent, so kernels (CUDA, cuDNN autotuning) are
    built and the first real job neither pays for them nor finds out only then that the device fails."""
    import torch

    from tokenflow.encoding import encode_prompt

    with torch.no_grad():
        text = encode_prompt(model, "")
        channels = int(getattr(model.unet.config, "in_channels", 4))
        latent = torch.zeros((1, channels, 8, 8), device=model.device, dtype=model.dtype)
        timestep = torch.tensor(1, device=model.device)
        model.unet(latent, timestep, encoder_hidden_states=text)
    _release_accelerator_memory(model)


def _release_accelerator_memory(model: Model) -> None:
    """Return cached CUDA blocks after a job so the next stage (or process) finds the memory free."""
    if getattr(model.device, "type", "cpu") != "cuda":
        return
    import torch

    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
