"""Small models in the three block styles people write, as plain nn.Modules (no mHC anywhere)."""

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64


class SelfAttention(nn.Module):
    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attention_mask=None, position_embeddings=None, causal=True):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin
        if attention_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


def _rotate(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _mlp(dim):
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


# nanoGPT: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))
class NanoGPTBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(dim), SelfAttention(dim), nn.LayerNorm(dim), _mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class NanoGPT(nn.Module):
    def __init__(self, dim=32, depth=3, seq=16):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(VOCAB, dim),
                wpe=nn.Embedding(seq, dim),
                h=nn.ModuleList(NanoGPTBlock(dim) for _ in range(depth)),
                ln_f=nn.LayerNorm(dim),
            )
        )
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# HF/LLaMA: residual = h; h = norm(h); h = attn(h, attention_mask=..., position_embeddings=...); h = residual + h
class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class LlamaMLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.down_proj = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(dim), SelfAttention(dim)
        self.post_attention_layernorm, self.mlp = RMSNorm(dim), LlamaMLP(dim)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, use_cache=False, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(
            hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return (hidden_states, None)


class LlamaLike(nn.Module):
    def __init__(self, dim=32, depth=3):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(LlamaDecoderLayer(dim) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        self.head_dim = dim // 2

    def rotary(self, t):
        inv = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        freqs = torch.outer(torch.arange(t).float(), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, input_ids):
        t = input_ids.shape[1]
        hidden_states = self.embed_tokens(input_ids)
        mask = torch.full((t, t), float("-inf")).triu(1)
        position_embeddings = self.rotary(t)
        for decoder_layer in self.layers:
            layer_outputs = decoder_layer(
                hidden_states, attention_mask=mask, position_embeddings=position_embeddings, use_cache=False
            )
            hidden_states = layer_outputs[0]
        return self.lm_head(self.norm(hidden_states))


# timm ViT: x = x + drop_path1(ls1(attn(norm1(x))))
class LayerScale(nn.Module):
    def __init__(self, dim, init=1e-1):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep / (1 - self.p)


class ViTBlock(nn.Module):
    def __init__(self, dim, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), SelfAttention(dim), LayerScale(dim)
        self.drop_path1 = DropPath(drop_path)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim), _mlp(dim), LayerScale(dim)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), causal=False)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class TinyViT(nn.Module):
    def __init__(self, dim=32, depth=3, patch=4, image=16, classes=10):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Linear(patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        b = images.shape[0]
        p = self.patch
        patches = images.unfold(1, p, p).unfold(2, p, p).reshape(b, -1, p * p)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(patches)], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


class Unsplittable(nn.Module):
    """A residual block whose sum is not `residual + F` on the input tensor: mHC wraps it whole."""

    def __init__(self, dim):
        super().__init__()
        self.mlp = _mlp(dim)

    def forward(self, x):
        return torch.addcmul(x, self.mlp(x), torch.ones_like(x))


class TokenStack(nn.Module):
    """Embedding, a list of ``block``s run in a plain loop, head."""

    def __init__(self, block, dim=32, depth=3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class UnsplittableNet(TokenStack):
    def __init__(self, dim=32, depth=3):
        super().__init__(Unsplittable, dim, depth)


def lm_batch(seed=0, batch=4, seq=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def image_batch(seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)


def param_formula(dim, streams, branches, mode="mhc", readout="mean"):
    """Parameters mHC adds: per branch phi (nC x (n^2+2n)) or theta (C x (n+2)), 3 gates, n^2+2n biases."""
    n = streams
    per_branch = (n * dim * (n * n + 2 * n) if mode == "mhc" else dim * (n + 2)) + 3 + n * n + 2 * n
    return branches * per_branch + (n if readout == "learned" else 0)


# Parallel attention + MLP (GPT-J / NeoX / litgpt parallel_residual): both branches read the block input.
class ParallelBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(dim), SelfAttention(dim), nn.LayerNorm(dim), _mlp(dim)

    def forward(self, x):
        return x + self.attn(self.ln_1(x)) + self.mlp(self.ln_2(x))


# In-place residual: x += f(x)
class InplaceBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln, self.mlp = nn.LayerNorm(dim), _mlp(dim)

    def forward(self, x):
        x += self.mlp(self.ln(x))
        return x


# timm ResNet BasicBlock: x = bn2(conv2(act1(bn1(conv1(x))))); x += shortcut; x = act2(x)  (NCHW)
class BasicBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x
        x = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        x += shortcut
        return self.act2(x)


# timm ConvNeXt block: depthwise conv on NCHW, then channels-last norm + MLP, layer scale, x = drop_path(x) + shortcut
class ConvNeXtBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm, self.mlp = nn.LayerNorm(channels), _mlp(channels)
        self.gamma = nn.Parameter(0.1 * torch.ones(channels))
        self.shortcut = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x)) * self.gamma
        return x.permute(0, 3, 1, 2) + self.shortcut(shortcut)


class ConvNet(nn.Module):
    """Stem, one stage of same-shape conv blocks (NCHW), pooled head; ``forward_intermediates`` like timm's."""

    def __init__(self, block, channels=16, depth=3, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(block(channels) for _ in range(depth)))
        self.head = nn.Linear(channels, classes)

    def forward(self, images):
        return self.head(self.blocks(self.stem(images)).mean((2, 3)))

    def forward_intermediates(self, images):
        x, intermediates = self.stem(images), []
        for block in self.blocks:
            x = block(x)
            intermediates.append(x)
        return intermediates


def rgb_batch(seed=0, batch=2, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)
