"""The diffusers reference branch (DESIGN §3) and its injection into a diffusers `UNet2DConditionModel`.

The trainer uses exactly this module; the ComfyUI nodes rebuild the same network from ComfyUI's own blocks and the
parity tests tie the two together. diffusers is imported inside the functions, so importing `painternet_core`
stays cheap for the nodes.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.utils.checkpoint
from torch import nn

from .config import PainterNetConfig


@dataclass
class BranchResiduals:
    """Unscaled control-point outputs, in injection order. `attention` is empty for BrushNet branches."""

    down: list[torch.Tensor]
    mid: torch.Tensor
    up: list[torch.Tensor]
    attention: list[torch.Tensor]


def _block_points(block: nn.Module, samplers: str) -> list[nn.Module]:
    attentions = getattr(block, "attentions", None)
    layers = [attentions[i] if attentions is not None else resnet for i, resnet in enumerate(block.resnets)]
    return layers + list(getattr(block, samplers) or [])


def control_point_modules(unet: nn.Module) -> tuple[list[nn.Module], nn.Module, list[nn.Module]]:
    """The modules whose outputs are the control points of a diffusers UNet (or of the branch, which has the same
    block structure): conv_in, each down layer (its attention if it has one, else its resnet), each downsampler;
    the mid block; each up layer and each upsampler. Adding to these outputs adds to the running hidden state, so a
    residual reaches both the skip connection and the next layer, as BrushNet does."""
    down = [unet.conv_in] + [p for block in unet.down_blocks for p in _block_points(block, "downsamplers")]
    up = [p for block in unet.up_blocks for p in _block_points(block, "upsamplers")]
    return down, unet.mid_block, up


def cross_attention_modules(unet: nn.Module) -> list[nn.Module]:
    """attn2 of every transformer block, in execution order (down, mid, up): the ACP order."""
    from diffusers.models.attention import BasicTransformerBlock

    # Explicit block order: a diffusers UNet registers up_blocks before mid_block, so modules() is not execution order.
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [m.attn2 for block in blocks for m in block.modules()
            if isinstance(m, BasicTransformerBlock) and m.attn2 is not None]


def _add_to_output(output: Any, residual: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (output[0] + residual.to(output[0].dtype),) + output[1:]
    if hasattr(output, "sample"):
        output.sample = output.sample + residual.to(output.sample.dtype)
        return output
    return output + residual.to(output.dtype)


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, tuple):
        return output[0]
    return output.sample if hasattr(output, "sample") else output


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class PainterNetBranch(nn.Module):
    """A full copy of the base UNet (cross-attention kept), 9-channel conv_in, no conv_out, plus zero-initialised
    layer control points (1×1 convs) and Attention Control Points (Linear per cross-attention transformer block).

    All trainable parameters live in this module and run inside its forward, which is what DDP, ZeRO and FSDP
    need; the base only adds the tensors returned here.
    """

    def __init__(self, config: PainterNetConfig) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = config
        body = UNet2DConditionModel.from_config(config.branch_unet_config)
        self.conv_in = body.conv_in
        self.time_proj = body.time_proj
        self.time_embedding = body.time_embedding
        if config.family == "sdxl":
            self.add_time_proj = body.add_time_proj
            self.add_embedding = body.add_embedding
        self.down_blocks = body.down_blocks
        self.mid_block = body.mid_block
        if not config.cross_attention:
            # BrushNet's mid block is two resnets without attention; diffusers' "UNetMidBlock2D" preset has one.
            from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

            unet = config.branch_unet_config
            self.mid_block = UNetMidBlock2D(
                in_channels=unet["block_out_channels"][-1], temb_channels=unet["block_out_channels"][0] * 4,
                num_layers=1, resnet_eps=unet.get("norm_eps", 1e-5), resnet_act_fn=unet.get("act_fn", "silu"),
                resnet_groups=unet.get("norm_num_groups", 32), add_attention=False,
            )
        self.up_blocks = body.up_blocks
        layout = config.layout
        self.layer_control_down = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in layout.down)
        self.layer_control_mid = _zero(nn.Conv2d(layout.mid, layout.mid, 1))
        self.layer_control_up = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in layout.up)
        self.attention_control = nn.ModuleList(_zero(nn.Linear(c, c)) for c in layout.attention)
        self.gradient_checkpointing = False

        _, _, up_points = control_point_modules(self)
        self._up_outputs: dict[int, torch.Tensor] = {}
        self._attn_outputs: dict[int, torch.Tensor] = {}
        # Keyed by position, so recomputation under gradient checkpointing overwrites instead of appending.
        for i, module in enumerate(up_points):
            module.register_forward_hook(self._recorder(self._up_outputs, i))
        if config.attention_control:
            attn2 = cross_attention_modules(self)
            if len(attn2) != len(layout.attention):
                raise RuntimeError(f"branch has {len(attn2)} cross-attention blocks, layout expects "
                                   f"{len(layout.attention)}")
            for i, module in enumerate(attn2):
                module.register_forward_hook(self._recorder(self._attn_outputs, i))

    @staticmethod
    def _recorder(store: dict[int, torch.Tensor], index: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            store[index] = _first(output)
        return hook

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' own block-level checkpointing, forced non-reentrant.

        Why set ``_gradient_checkpointing_func`` too: diffusers blocks call ``self._gradient_checkpointing_func`` when
        ``gradient_checkpointing`` is on, and only ``ModelMixin.enable_gradient_checkpointing`` sets it; the branch is
        a plain ``nn.Module``, so without it the first checkpointed block raises AttributeError. Non-reentrant because
        reentrant checkpointing silently zeroes the ATAL gradient (the maps are stored outside the block's outputs).
        """
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        self.gradient_checkpointing = True
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing") and module is not self:
                module.gradient_checkpointing = True
                module._gradient_checkpointing_func = checkpoint

    @classmethod
    def from_unet(cls, unet: nn.Module, **config_kwargs: Any) -> "PainterNetBranch":
        """Initialise from a diffusers UNet: every copied weight equal, conv_in channels 0-3 and 4-7 from the UNet's
        conv_in, channel 8 (mask) zero, control points zero, so base+branch == base at step 0."""
        config = PainterNetConfig.from_unet_config(unet.config, **config_kwargs)
        branch = cls(config).to(device=unet.device, dtype=unet.dtype)
        base = unet.state_dict()
        own = branch.state_dict()
        copied = {k: v for k, v in base.items() if k in own and k != "conv_in.weight" and own[k].shape == v.shape}
        w = base["conv_in.weight"]
        conv_in = torch.zeros_like(own["conv_in.weight"])
        conv_in[:, 0:4] = w
        conv_in[:, 4:8] = w
        copied["conv_in.weight"] = conv_in
        missing = [k for k in own if k not in copied and not k.startswith(("layer_control", "attention_control"))]
        if missing:
            raise ValueError(f"base UNet lacks {len(missing)} weights the branch copies (e.g. {missing[:3]}); "
                             "is it an SD1.5/SDXL UNet?")
        branch.load_state_dict(copied, strict=False)
        return branch

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        condition: torch.Tensor,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    ) -> BranchResiduals:
        """`sample` is z_t (B,4,h,w), `condition` is [z_masked, m_latent] (B,5,h,w) from `conditioning.py`."""
        x = torch.cat([sample, condition.to(sample.dtype)], dim=1)
        batch = x.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=x.device)
        timestep = timestep.to(x.device).reshape(-1).expand(batch)
        emb = self.time_embedding(self.time_proj(timestep).to(x.dtype))
        if self.config.family == "sdxl":
            if added_cond_kwargs is None or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise ValueError("an SDXL branch needs added_cond_kwargs with 'text_embeds' and 'time_ids'")
            time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten()).reshape(batch, -1)
            add = torch.cat([added_cond_kwargs["text_embeds"], time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(add)
        cross = self.config.cross_attention
        kwargs = {"encoder_hidden_states": encoder_hidden_states} if cross else {}

        self._up_outputs.clear()
        self._attn_outputs.clear()
        h = self.conv_in(x)
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in self.down_blocks:
            use_cross = getattr(block, "has_cross_attention", False)
            h, res = block(hidden_states=h, temb=emb, **(kwargs if use_cross else {}))
            skips += res
        down = list(skips)
        h = self.mid_block(h, emb, **(kwargs if getattr(self.mid_block, "has_cross_attention", False) else {}))
        mid = h
        for i, block in enumerate(self.up_blocks):
            res = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if i < len(self.up_blocks) - 1 else None
            use_cross = getattr(block, "has_cross_attention", False)
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size,
                      **(kwargs if use_cross else {}))
        up = [self._up_outputs[i] for i in range(len(self.layer_control_up))]
        attn = [self._attn_outputs[i] for i in range(len(self.attention_control))]
        self._up_outputs.clear()
        self._attn_outputs.clear()
        return BranchResiduals(
            down=[conv(r) for conv, r in zip(self.layer_control_down, down)],
            mid=self.layer_control_mid(mid),
            up=[conv(r) for conv, r in zip(self.layer_control_up, up)],
            attention=[lin(a) for lin, a in zip(self.attention_control, attn)],
        )


@contextlib.contextmanager
def injected(unet: nn.Module, residuals: BranchResiduals, scale: float = 1.0) -> Iterator[None]:
    """Within the block, `unet`'s forward adds `scale` × each residual at its control point (ACP residuals to the
    attn2 output of the same transformer block, before the residual add). Hooks, not a forked UNet."""
    down, mid, up = control_point_modules(unet)
    if len(down) != len(residuals.down) or len(up) != len(residuals.up):
        raise ValueError(f"branch has {len(residuals.down)}/{len(residuals.up)} down/up control points, the UNet "
                         f"{len(down)}/{len(up)}: branch and base are different families or topologies")
    pairs = list(zip(down, residuals.down)) + [(mid, residuals.mid)] + list(zip(up, residuals.up))
    if residuals.attention:
        attn2 = cross_attention_modules(unet)
        if len(attn2) != len(residuals.attention):
            raise ValueError(f"branch has {len(residuals.attention)} ACPs, the UNet {len(attn2)} cross-attention "
                             "blocks: branch and base topologies differ")
        pairs += list(zip(attn2, residuals.attention))
    handles = []
    try:
        for module, residual in pairs:
            r = residual * scale
            handles.append(module.register_forward_hook(lambda _m, _a, out, r=r: _add_to_output(out, r)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def painternet_unet_forward(
    unet: nn.Module,
    branch: PainterNetBranch,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    condition: torch.Tensor,
    scale: float = 1.0,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference base+branch noise prediction: run the branch, then the base with the residuals injected."""
    residuals = branch(sample, timestep, encoder_hidden_states, condition, added_cond_kwargs)
    with injected(unet, residuals, scale):
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                    added_cond_kwargs=dict(added_cond_kwargs) if added_cond_kwargs else None).sample
