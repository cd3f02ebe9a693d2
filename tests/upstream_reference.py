"""An independent, literal re-statement of the upstream RadioDiff / Latent-Diffusion network
(explicit bmm attention, temb argument, list resolution), used only to check that our
AutoencoderKL matches it key for key and output for output."""
import torch
from torch import nn


def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def _act(x):
    return x * torch.sigmoid(x)


class RefResnet(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.dropout = _norm(cout), nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x, temb=None):
        h = self.conv1(_act(self.norm1(x)))
        h = self.conv2(self.dropout(_act(self.norm2(h))))
        return (self.nin_shortcut(x) if self.cin != self.cout else x) + h


class RefAttn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w))
        w_ = torch.softmax(w_ * (int(c) ** (-0.5)), dim=2)
        h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class RefDown(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(nn.functional.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class RefUp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class RefAutoencoderKL(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, embed_dim, in_channels=1, out_ch=1):
        super().__init__()
        self.encoder, self.decoder = nn.Module(), nn.Module()
        e, d, n = self.encoder, self.decoder, len(ch_mult)
        e.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        e.down = nn.ModuleList()
        for i in range(n):
            lvl = nn.Module()
            bi, bo = ch * in_mult[i], ch * ch_mult[i]
            lvl.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                lvl.block.append(RefResnet(bi, bo))
                bi = bo
            lvl.attn = nn.ModuleList()
            if i != n - 1:
                lvl.downsample = RefDown(bi)
            e.down.append(lvl)
        for part, c in ((e, bi), (d, ch * ch_mult[-1])):
            part.mid = nn.Module()
            part.mid.block_1, part.mid.attn_1, part.mid.block_2 = RefResnet(c, c), RefAttn(c), RefResnet(c, c)
        e.norm_out, e.conv_out = _norm(bi), nn.Conv2d(bi, 2 * z_channels, 3, 1, 1)
        bi = ch * ch_mult[-1]
        d.conv_in = nn.Conv2d(z_channels, bi, 3, 1, 1)
        d.up = nn.ModuleList()
        for i in reversed(range(n)):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                lvl.block.append(RefResnet(bi, ch * ch_mult[i]))
                bi = ch * ch_mult[i]
            if i != 0:
                lvl.upsample = RefUp(bi)
            d.up.insert(0, lvl)
        d.norm_out, d.conv_out = _norm(bi), nn.Conv2d(bi, out_ch, 3, 1, 1)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.n = n

    def encode_moments(self, x):
        e = self.encoder
        hs = [e.conv_in(x)]
        for i in range(self.n):
            for blk in e.down[i].block:
                hs.append(blk(hs[-1], None))
            if i != self.n - 1:
                hs.append(e.down[i].downsample(hs[-1]))
        h = e.mid.block_2(e.mid.attn_1(e.mid.block_1(hs[-1], None)), None)
        return self.quant_conv(e.conv_out(_act(e.norm_out(h))))

    def decode(self, z):
        d = self.decoder
        h = d.conv_in(self.post_quant_conv(z))
        h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(h, None)), None)
        for i in reversed(range(self.n)):
            for blk in d.up[i].block:
                h = blk(h, None)
            if i != 0:
                h = d.up[i].upsample(h)
        return d.conv_out(_act(d.norm_out(h)))
