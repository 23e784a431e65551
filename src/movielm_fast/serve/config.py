"""What one `serve` process accepts and holds at once: its connection guards and the work a submitted plan may ask
for. Each is declared once here with `setting(...)`; `serve`'s flags are made from these declarations
(cli/serve_cmds.py). docs/safety.md says what each one guards against."""

from __future__ import annotations

from movielm_fast.settings import Settings, setting

NATIVE_PIXELS_FACTOR = 4
"""A frame may have up to this many times the model's native pixel count (twice its native side)."""
NATIVE_PLAN = (1000, 50)
"""The default work limit of a plan: this many frames of the model's native size at this many steps."""


class ServeLimits(Settings):
    max_connections: int = setting(
        64, "Connections held open at once; one more is closed as soon as it arrives (a client that opens many and "
            "never finishes them cannot use up the server's file handles).", ge=1, le=65536)
    header_timeout: float = setting(
        10.0, "Seconds a client has to send a request's headers, from connecting (or from the previous response on "
              "the connection), before it is disconnected.", gt=0, le=3600)
    body_timeout: float = setting(
        60.0, "Seconds a client has to send a request's body before it gets 408.", gt=0, le=3600)
    max_frame_pixels: int | None = setting(
        None, f"Most pixels (width x height) a submitted frame may ask for [{NATIVE_PIXELS_FACTOR}x the model's "
              "native count: 1024x1024 for a 512 px model].", ge=64 * 64, metavar="PIXELS")
    max_plan_megapixel_steps: float | None = setting(
        None, "Most work a submitted plan may ask for: the sum over its frames of megapixels x denoising steps "
              f"[{NATIVE_PLAN[0]} frames of the model's native size at {NATIVE_PLAN[1]} steps: 13107 for a 512 px "
              "model].", gt=0, metavar="MPX_STEPS")

    def for_model(self, native_width: int, native_height: int) -> "ServeLimits":
        """The limits with the model-dependent defaults filled in from its native size."""
        native = native_width * native_height
        return self.changed(
            max_frame_pixels=self.max_frame_pixels or NATIVE_PIXELS_FACTOR * native,
            max_plan_megapixel_steps=self.max_plan_megapixel_steps
            or round(native / 1e6 * NATIVE_PLAN[0] * NATIVE_PLAN[1], 1))
