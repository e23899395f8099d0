"""The one model of a server process, loaded lazily, and the lock that serialises its use.

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

if TYPE_CHECKING:  # torch is imported only when a model is actually loaded
    from tokenflow.models import Model

log = logging.getLogger(__name__)

PRESETS: tuple[str, ...] = ("tiny", "sd15-arch", "sd21-arch")
"""Random-weight presets (mirrors tokenflow.models.PRESETS without importing torch)."""
_LOCK_POLL_SECONDS = 0.2


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
                self._model = self._load()
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
        """Load now (e.g. from a start-up thread); log instead of raising. True if the model is ready."""
        try:
            self.get()
        except ModelError as e:
            log.error("model not available: %s", e)
            return False
        return True

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


def _release_accelerator_memory(model: Model) -> None:
    """Return cached CUDA blocks after a job so the next stage (or process) finds the memory free."""
    if getattr(model.device, "type", "cpu") != "cuda":
        return
    import torch

    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
