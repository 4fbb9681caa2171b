"""Synthetic music for the demo catalogue: styles that differ the way genres do.

Each style fixes the musical choices a genre makes (tempo range, swing, drum patterns,
drum kit, bass line, comping, lead timbre and register, effects, loudness); every track
draws its own key, tempo, arrangement, section changes, timbre and mix variations from
its own ``numpy.random.Generator``, so a track never depends on the others.

Rendering is vectorised numpy: every note is a band-limited wavetable oscillator with an
envelope, every drum hit a pre-rendered one-shot added into the bus, filters are
``scipy.signal`` IIR sections and reverb is an overlap-add convolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import signal

STEPS_PER_BAR = 16          # a 4/4 bar in sixteenth notes
TABLE_SIZE = 4096           # wavetable length (power of two: phase wraps with a mask)

SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
}


@dataclass(frozen=True)
class Part:
    """A pitched part: rhythm over one bar ('x' onset, '-' hold, '.' rest), how pitches are
    chosen, register, timbre and bus effects."""
    rhythms: tuple[str, ...]            # one is chosen per section
    mode: str                           # root | walk | chord | melody | drone
    register: tuple[int, int]           # MIDI range of the part
    timbre: str
    voicing: str = "triad"              # chords: triad | seventh | power | open
    gate: float = 0.9                   # fraction of the written length the note is held
    density: float = 0.5                # melody: onset probability per 'x' candidate
    distortion: float = 0.0             # tanh drive on the bus
    highpass: float = 0.0               # Hz, 0 = none
    lowpass: float = 0.0                # Hz, 0 = none
    level_db: float = 0.0
    presence: float = 1.0               # probability the part plays in a section


@dataclass(frozen=True)
class Style:
    name: str
    bpm: tuple[float, float]
    scale: str
    progressions: tuple[tuple[int, ...], ...]   # scale degrees, one chord per bar
    drums: dict[str, tuple[str, ...]]           # instrument -> bar patterns (x accent, o normal, g ghost)
    kit: dict[str, dict[str, float]]
    parts: tuple[Part, ...]
    swing8: float = 0.0          # delay of off-beat eighths, fraction of a beat
    swing16: float = 0.0         # delay of off-beat sixteenths, fraction of a sixteenth
    rubato: float = 0.0          # depth of slow tempo wobble
    humanise_ms: float = 3.0
    drum_level_db: float = 0.0
    drum_drive: float = 0.0
    reverb_wet: float = 0.0
    reverb_seconds: float = 1.0
    hiss_db: float = -90.0
    crackle: float = 0.0         # vinyl clicks per second
    loudness_db: float = -16.0   # target RMS of the master
    breakdown_probability: float = 0.2


# ---------------------------------------------------------------- the styles
STYLES: tuple[Style, ...] = (
    Style(
        "techno", (124, 136), "minor", ((0,), (0, 0, 5, 6), (0, 3)),
        drums={"kick": ("x...x...x...x...",),
               "clap": ("....x.......x...",),
               "hat": ("..x...x...x...x.", "..x...x...x..gxg"),
               "shaker": ("gggggggggggggggg",)},
        kit={"kick": dict(f0=160, f1=48, sweep=0.03, decay=0.28, click=0.3),
             "clap": dict(decay=0.12, low=900, high=2500),
             "hat": dict(decay=0.05, cutoff=8000), "shaker": dict(decay=0.02, cutoff=6000)},
        parts=(Part(("..x-..x-..x-..x-", "x.xxx.xxx.xxx.xx"), "root", (33, 45), "saw", gate=0.7,
                    lowpass=900, distortion=1.5, level_db=-3),
               Part(("...x.....x....x.", "..x..x....x..x.."), "chord", (57, 72), "stab", voicing="triad",
                    gate=0.5, highpass=300, level_db=-10, presence=0.6),
               Part(("xxxxxxxxxxxxxxxx",), "melody", (60, 79), "square", gate=0.5, density=0.5,
                    lowpass=3000, level_db=-14, presence=0.4)),
        drum_level_db=2, drum_drive=1.5, loudness_db=-12, breakdown_probability=0.25),
    Style(
        "hiphop", (84, 96), "minor", ((0, 5), (0, 3, 4, 0), (5, 4)),
        drums={"kick": ("x.....x...x.....", "x......xx.x....."),
               "snare": ("....x.......x...", "....x.......x..g"),
               "hat": ("x.x.x.x.x.x.x.x.", "x.x.x.xxx.x.x.x.")},
        kit={"kick": dict(f0=110, f1=45, sweep=0.05, decay=0.4, click=0.1),
             "snare": dict(tone=190, tone_decay=0.06, noise_decay=0.16, noise_low=1200, level=1.2),
             "hat": dict(decay=0.04, cutoff=6500)},
        parts=(Part(("x.........x-----", "x-----....x-x---"), "root", (26, 38), "sub", gate=0.9, level_db=0),
               Part(("x---------------", "x-------x-------"), "chord", (55, 70), "epiano", voicing="seventh",
                    gate=0.95, level_db=-9, lowpass=3500),
               Part(("x.x.x.x.x.x.x.x.",), "melody", (67, 84), "flute", gate=0.8, density=0.25,
                    level_db=-13, presence=0.5)),
        swing16=0.28, drum_level_db=3, hiss_db=-46, crackle=6, loudness_db=-14),
    Style(
        "ambient", (60, 80), "major", ((0, 3), (0, 5, 3, 4), (0,)),
        drums={}, kit={},
        parts=(Part(("x---------------",), "drone", (28, 40), "sub", gate=1.0, level_db=-6),
               Part(("x---------------",), "chord", (52, 72), "pad", voicing="open", gate=1.0, level_db=-2),
               Part(("x.......x.......", "x...x...x...x..."), "melody", (72, 96), "bell", gate=0.4,
                    density=0.35, level_db=-10)),
        reverb_wet=0.55, reverb_seconds=3.5, hiss_db=-60, loudness_db=-22, breakdown_probability=0.0),
    Style(
        "punk", (160, 195), "major", ((0, 3, 4, 3), (0, 4, 5, 3), (0, 5, 3, 4)),
        drums={"kick": ("x.......x.x.....", "x...x...x...x..."),
               "snare": ("....x.......x...", "....x.......x.xx"),
               "hat": ("x.x.x.x.x.x.x.x.",), "crash": ("x...............",)},
        kit={"kick": dict(f0=140, f1=55, sweep=0.02, decay=0.18, click=0.5),
             "snare": dict(tone=220, tone_decay=0.05, noise_decay=0.22, noise_low=1500, level=1.6),
             "hat": dict(decay=0.09, cutoff=6000), "crash": dict(decay=1.0, cutoff=4000)},
        parts=(Part(("x.x.x.x.x.x.x.x.",), "root", (28, 40), "saw", gate=0.8, lowpass=1500,
                    distortion=3, level_db=-4),
               Part(("x.x.x.x.x.x.x.x.", "x-x-x-x-x-x-x-x-"), "chord", (40, 55), "guitar", voicing="power",
                    gate=0.85, distortion=12, lowpass=5000, level_db=0),
               Part(("x.x.x.x.x.x.x.x.",), "melody", (60, 76), "guitar", gate=0.9, density=0.6,
                    distortion=8, lowpass=6000, level_db=-6, presence=0.4)),
        humanise_ms=6, drum_level_db=2, drum_drive=2.5, hiss_db=-40, loudness_db=-11,
        breakdown_probability=0.1),
    Style(
        "jazz", (110, 170), "dorian", ((1, 4, 0, 0), (1, 4, 0, 5), (3, 4, 2, 5)),
        drums={"ride": ("x...x..ox...x..o",), "hatfoot": ("....x.......x...",),
               "kick": ("g...........g...", "g.......g.......")},
        kit={"ride": dict(decay=0.9, base=3200), "hatfoot": dict(decay=0.03, cutoff=5000),
             "kick": dict(f0=90, f1=50, sweep=0.04, decay=0.25, click=0.0)},
        parts=(Part(("x...x...x...x...",), "walk", (28, 43), "upright", gate=0.85, level_db=-1),
               Part(("x.....x.........", "...x......x.....", "..x.......x...x."), "chord", (52, 67), "piano",
                    voicing="seventh", gate=0.6, level_db=-7),
               Part(("x.x.x.x.x.x.x.x.", "x...x.x.x.x...x."), "melody", (62, 82), "piano", gate=0.8,
                    density=0.55, level_db=-5, presence=0.7)),
        swing8=0.17, humanise_ms=8, drum_level_db=-4, reverb_wet=0.15, reverb_seconds=1.2,
        loudness_db=-20, breakdown_probability=0.1),
    Style(
        "reggae", (68, 84), "major", ((0, 4), (0, 3, 4, 3), (5, 3, 0, 4)),
        drums={"kick": ("........x.......",), "rim": ("........x.......", "....x.......x..."),
               "hat": ("x.x.x.x.x.x.x.x.", "..x...x...x...x.")},
        kit={"kick": dict(f0=100, f1=50, sweep=0.04, decay=0.3, click=0.05),
             "rim": dict(tone=820, decay=0.04), "hat": dict(decay=0.05, cutoff=7000)},
        parts=(Part(("..x.x..x..x.x...", "x-..x.x...x-x..."), "walk", (33, 45), "sub", voicing="triad",
                    gate=0.8, level_db=0, lowpass=600),
               Part(("....x.......x...", "..x...x...x...x."), "chord", (57, 69), "skank", voicing="triad",
                    gate=0.25, highpass=500, level_db=-6),
               Part(("x.x.x.x.x.x.x.x.",), "melody", (62, 79), "organ", gate=0.8, density=0.3,
                    level_db=-11, presence=0.5)),
        swing16=0.12, drum_level_db=-1, reverb_wet=0.2, reverb_seconds=1.5, loudness_db=-15),
    Style(
        "classical", (60, 100), "major", ((0, 3, 4, 0), (0, 5, 1, 4), (5, 3, 4, 0)),
        drums={}, kit={},
        parts=(Part(("x-------x-------",), "root", (36, 50), "strings", gate=0.95, level_db=-4),
               Part(("x-------x-------", "x---------------"), "chord", (55, 72), "strings", voicing="triad",
                    gate=0.95, level_db=-6),
               Part(("x-x-x-x-x-x-x-x-", "x---x-x-x---x-x-"), "melody", (67, 91), "violin", gate=0.95,
                    density=0.7, level_db=0)),
        rubato=0.08, humanise_ms=15, reverb_wet=0.35, reverb_seconds=2.2, loudness_db=-21,
        breakdown_probability=0.0),
    Style(
        "dnb", (165, 178), "minor", ((0, 5), (0, 0, 6, 5), (0, 3)),
        drums={"kick": ("x.........x.....", "x.x.......x....."),
               "snare": ("....x.......x...", "....x..g.g..x..g"),
               "hat": ("x.xxx.xxx.xxx.xx",), "ride": ("x...x...x...x...",)},
        kit={"kick": dict(f0=150, f1=52, sweep=0.025, decay=0.2, click=0.3),
             "snare": dict(tone=240, tone_decay=0.04, noise_decay=0.12, noise_low=2000, level=1.4),
             "hat": dict(decay=0.03, cutoff=9000), "ride": dict(decay=0.5, base=4200)},
        parts=(Part(("x-------x-------", "x---------------"), "root", (24, 36), "reese", gate=1.0,
                    lowpass=500, distortion=2, level_db=0),
               Part(("x---------------",), "chord", (55, 72), "pad", voicing="open", gate=1.0,
                    level_db=-12, presence=0.6),
               Part(("x.....x.....x...",), "melody", (64, 84), "stab", gate=0.4, density=0.4,
                    level_db=-12, presence=0.4)),
        drum_level_db=4, drum_drive=1.2, reverb_wet=0.1, reverb_seconds=1.0, loudness_db=-12,
        breakdown_probability=0.25),
)
STYLE_NAMES: tuple[str, ...] = tuple(s.name for s in STYLES)


# ---------------------------------------------------------------- timbres (wavetables + envelopes)
@dataclass(frozen=True)
class Timbre:
    bright: tuple[float, float]        # harmonic roll-off: amplitude k**-a * exp(-k/b) at the attack
    dark: tuple[float, float]          # ... and once the brightness has decayed
    odd_only: bool = False
    attack: float = 0.005
    decay: float = 0.3
    sustain: float = 0.7
    release: float = 0.08
    bright_tau: float = 0.0            # seconds for bright -> dark; 0 = stays bright
    vibrato: tuple[float, float] = (0.0, 0.0)   # depth (fraction of f), rate Hz
    detune_cents: float = 0.0
    oscillators: int = 1
    extra: dict[int, float] = field(default_factory=dict)   # extra harmonic weights (bells, organs)


TIMBRES: dict[str, Timbre] = {
    "saw": Timbre((1.0, 60), (1.0, 6), decay=0.25, sustain=0.5, bright_tau=0.12),
    "square": Timbre((1.0, 40), (1.0, 8), odd_only=True, decay=0.2, sustain=0.4),
    "stab": Timbre((1.0, 30), (1.3, 5), odd_only=True, decay=0.15, sustain=0.0, bright_tau=0.05),
    "sub": Timbre((3.0, 2), (3.0, 2), attack=0.01, decay=0.5, sustain=0.8, release=0.1),
    "upright": Timbre((1.6, 8), (2.2, 3), attack=0.004, decay=0.45, sustain=0.15, release=0.05,
                      bright_tau=0.08),
    "piano": Timbre((1.1, 30), (2.5, 6), attack=0.002, decay=0.7, sustain=0.1, release=0.15,
                    bright_tau=0.2),
    "epiano": Timbre((2.5, 4), (3.0, 3), attack=0.003, decay=0.9, sustain=0.3, release=0.3,
                     bright_tau=0.1, extra={7: 0.12, 14: 0.05}),
    "pad": Timbre((1.3, 10), (1.6, 6), attack=1.2, decay=2.0, sustain=0.9, release=1.5,
                  detune_cents=12, oscillators=3),
    "strings": Timbre((1.0, 14), (1.0, 10), attack=0.25, decay=1.0, sustain=0.95, release=0.35,
                      vibrato=(0.005, 5.5), detune_cents=7, oscillators=2),
    "violin": Timbre((0.9, 18), (1.0, 14), attack=0.12, decay=1.0, sustain=0.95, release=0.25,
                     vibrato=(0.008, 6.0)),
    "organ": Timbre((9.0, 1), (9.0, 1), attack=0.01, decay=1.0, sustain=1.0, release=0.04,
                    extra={1: 1.0, 2: 0.8, 3: 0.6, 4: 0.45, 6: 0.3, 8: 0.25}),
    "skank": Timbre((0.8, 25), (1.5, 8), attack=0.002, decay=0.08, sustain=0.2, release=0.03,
                    bright_tau=0.03),
    "flute": Timbre((3.5, 3), (3.5, 3), attack=0.06, decay=1.0, sustain=0.9, release=0.15,
                    vibrato=(0.006, 5.0)),
    "bell": Timbre((3.0, 3), (4.0, 2), attack=0.003, decay=1.8, sustain=0.0, release=1.0,
                   bright_tau=0.4, extra={3: 0.35, 5: 0.2, 9: 0.1}),
    "guitar": Timbre((1.0, 40), (1.4, 10), attack=0.003, decay=0.6, sustain=0.6, release=0.06,
                     bright_tau=0.15),
    "reese": Timbre((1.0, 12), (1.0, 8), attack=0.02, decay=1.0, sustain=1.0, release=0.1,
                    detune_cents=22, oscillators=2),
}


def _harmonics(shape: tuple[float, float], odd_only: bool, extra: dict[int, float], n: int,
               tilt: float) -> np.ndarray:
    k = np.arange(1, n + 1, dtype=np.float64)
    a, b = shape
    amps = k ** -(a + tilt) * np.exp(-k / b)
    if odd_only:
        amps[1::2] = 0.0
    for h, w in extra.items():
        if h <= n:
            amps[h - 1] += w
    return amps


class Wavetables:
    """Band-limited single-cycle tables, cached per (timbre, brightness, harmonic count)."""

    def __init__(self, sample_rate: int, tilt: float):
        self.sample_rate = sample_rate
        self.tilt = tilt
        self._cache: dict[tuple, np.ndarray] = {}

    def table(self, timbre: Timbre, which: str, freq: float) -> np.ndarray:
        # Harmonics above Nyquist alias: cap by pitch, quantised to octaves to share tables.
        n = int(max(1, min(64, self.sample_rate * 0.45 / max(freq, 20.0))))
        n = 1 << int(np.log2(n))
        key = (id(timbre), which, n)
        tab = self._cache.get(key)
        if tab is None:
            amps = _harmonics(timbre.bright if which == "bright" else timbre.dark,
                              timbre.odd_only, timbre.extra, n, self.tilt)
            # A sum of sines sin(2 pi k x) is an inverse real FFT with -i*a_k/2 at bin k.
            spectrum = np.zeros(TABLE_SIZE // 2 + 1, dtype=np.complex128)
            spectrum[1:n + 1] = -0.5j * amps * TABLE_SIZE
            tab = np.fft.irfft(spectrum, TABLE_SIZE).astype(np.float32)
            tab /= max(1e-9, float(np.abs(tab).max()))
            self._cache[key] = tab
        return tab


def midi_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69.0) / 12.0)


class NoteRenderer:
    """Renders notes of one track; envelopes are cached per (timbre, gate) since rhythms repeat."""

    # Phase as uint32 fixed point: the table index is the top bits and wrap-around is free.
    PHASE_BITS = 32 - int(np.log2(TABLE_SIZE))

    def __init__(self, tables: Wavetables, env_scale: float, rng: np.random.Generator):
        self.tables = tables
        self.env_scale = env_scale
        self.rng = rng
        self._envelopes: dict[tuple, tuple[np.ndarray, np.ndarray | None]] = {}
        self._ramp = np.arange(0, dtype=np.uint32)

    def _envelope(self, timbre: Timbre, gate: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        key = (id(timbre), gate, length)
        cached = self._envelopes.get(key)
        if cached is None:
            t = np.arange(length, dtype=np.float32) / np.float32(self.tables.sample_rate)
            attack = max(timbre.attack * self.env_scale, 1e-4)
            decay = timbre.decay * self.env_scale
            env = np.minimum(t / attack, 1.0) * (timbre.sustain + (1 - timbre.sustain) * np.exp(-t / decay))
            g = min(gate, length - 1)
            env[g:] = env[g] * np.exp(-(t[g:] - t[g]) / max(timbre.release, 1e-3))
            env *= np.float32(1.0 / np.sqrt(timbre.oscillators))
            fade = (1.0 - np.exp(-t / timbre.bright_tau)).astype(np.float32) if timbre.bright_tau > 0 else None
            cached = (env.astype(np.float32), fade)
            self._envelopes[key] = cached
        return cached

    def render(self, timbre: Timbre, freq: float, gate_s: float) -> np.ndarray:
        """One note: detuned wavetable oscillators, bright->dark crossfade, ADSR envelope."""
        sr = self.tables.sample_rate
        gate = int(gate_s * sr)
        length = gate + int(min(3.0 * timbre.release, 2.0) * sr) + 1
        env, fade = self._envelope(timbre, gate, length)
        if len(self._ramp) < length:
            self._ramp = np.arange(length * 2, dtype=np.uint32)
        ramp = self._ramp[:length]
        bright = self.tables.table(timbre, "bright", freq)
        dark = self.tables.table(timbre, "dark", freq) if fade is not None else None
        one = 1 << self.PHASE_BITS
        depth, rate = timbre.vibrato
        if depth:
            t = ramp / sr
            vibrato = depth / (2 * np.pi * rate) * np.sin(2 * np.pi * rate * t + self.rng.uniform(0, 6.28))
        out = np.zeros(length, dtype=np.float32)
        for o in range(timbre.oscillators):
            cents = timbre.detune_cents * (o - (timbre.oscillators - 1) / 2)
            f = freq * 2.0 ** (cents / 1200.0)
            step = np.uint32(int(round(f / sr * TABLE_SIZE * one)) & 0xFFFFFFFF)
            phase = ramp * step
            phase += np.uint32(self.rng.integers(0, 1 << 32))
            if depth:
                phase += (vibrato * (f * TABLE_SIZE * one)).astype(np.int64).astype(np.uint32)
            idx = phase >> np.uint32(self.PHASE_BITS)
            wave = bright[idx]
            if dark is not None:
                wave += (dark[idx] - wave) * fade
            out += wave
        out *= env
        return out


# ---------------------------------------------------------------- drums (one-shots)
def _butter(x: np.ndarray, sr: int, kind: str, freq) -> np.ndarray:
    nyq = sr / 2.0
    f = np.clip(np.atleast_1d(np.asarray(freq, dtype=np.float64)) / nyq, 1e-4, 0.95)
    sos = signal.butter(2, f if len(f) > 1 else f[0], btype=kind, output="sos")
    return signal.sosfilt(sos, x).astype(np.float32)


def drum_one_shot(name: str, params: dict[str, float], sr: int, rng: np.random.Generator) -> np.ndarray:
    jitter = lambda v: v * rng.uniform(0.85, 1.15)   # noqa: E731 - the kit of each track differs
    if name == "kick":
        decay = jitter(params["decay"])
        t = np.arange(int(decay * 5 * sr)) / sr
        f = jitter(params["f1"]) + (jitter(params["f0"]) - params["f1"]) * np.exp(-t / params["sweep"])
        x = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t / decay)
        x += params["click"] * rng.standard_normal(len(t)) * np.exp(-t / 0.003)
        return x.astype(np.float32)
    if name in ("snare", "rim"):
        length = int(0.5 * sr)
        t = np.arange(length) / sr
        tone_decay = params.get("tone_decay", params.get("decay", 0.05))
        x = np.sin(2 * np.pi * jitter(params["tone"]) * t) * np.exp(-t / tone_decay)
        if name == "snare":
            noise = _butter(rng.standard_normal(length), sr, "highpass", jitter(params["noise_low"]))
            x = 0.6 * x + params["level"] * noise * np.exp(-t / jitter(params["noise_decay"]))
        return x.astype(np.float32)
    if name in ("hat", "shaker", "hatfoot", "crash"):
        decay = jitter(params["decay"])
        length = int(decay * 4 * sr)
        t = np.arange(length) / sr
        noise = _butter(rng.standard_normal(length), sr, "highpass", jitter(params["cutoff"]))
        return (0.6 * noise * np.exp(-t / decay)).astype(np.float32)
    if name == "clap":
        length = int(0.4 * sr)
        t = np.arange(length) / sr
        noise = _butter(rng.standard_normal(length), sr, "bandpass", [params["low"], params["high"]])
        bursts = sum(np.exp(-np.clip(t - d, 0, None) / 0.006) * (t >= d) for d in (0.0, 0.011, 0.022))
        return (noise * (0.5 * bursts + np.exp(-t / jitter(params["decay"])))).astype(np.float32)
    if name == "ride":
        decay = jitter(params["decay"])
        length = int(decay * 4 * sr)
        t = np.arange(length) / sr
        ratios = np.array([1.0, 1.47, 1.98, 2.44, 2.91, 3.37])
        partials = np.sin(2 * np.pi * np.outer(t, jitter(params["base"]) * ratios) + rng.uniform(0, 6.3, 6))
        metal = partials.sum(axis=1) / 6 + 0.4 * _butter(rng.standard_normal(length), sr, "highpass", 7000)
        return (0.5 * metal * np.exp(-t / decay) * (1 + 2 * np.exp(-t / 0.01))).astype(np.float32)
    raise ValueError(f"unknown drum {name!r}")


def _comb(x: np.ndarray, delay: int, gain: float) -> np.ndarray:
    """y[n] = x[n] + gain * y[n - delay], one delay-length block at a time (vectorised per block)."""
    y = x.copy()
    for start in range(delay, len(y), delay):
        end = min(len(y), start + delay)
        y[start:end] += gain * y[start - delay:end - delay]
    return y


def _allpass(x: np.ndarray, delay: int, gain: float) -> np.ndarray:
    """Schroeder all-pass: y[n] = -g x[n] + x[n-D] + g y[n-D], block by block."""
    y = -gain * x
    y[delay:] += x[:-delay]
    for start in range(delay, len(y), delay):
        end = min(len(y), start + delay)
        y[start:end] += gain * y[start - delay:end - delay]
    return y


def reverb(x: np.ndarray, sr: int, t60: float, rng: np.random.Generator) -> np.ndarray:
    """Schroeder reverb (parallel combs, series all-passes), darkened like a real room."""
    wet = np.zeros_like(x)
    for base in (0.0297, 0.0371, 0.0411, 0.0437):
        delay = int(base * rng.uniform(0.9, 1.1) * sr)
        wet += _comb(x, delay, 10 ** (-3.0 * delay / (t60 * sr)))
    for base in (0.0127, 0.0093):
        wet = _allpass(wet, max(1, int(base * sr)), 0.7)
    return _butter(wet * 0.25, sr, "lowpass", 4500)


# ---------------------------------------------------------------- the arrangement
def _step_times(n_steps: int, bpm: float, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Onset time (s) of every sixteenth: tempo (with rubato), swing, humanisation."""
    step = 60.0 / bpm / 4.0
    durations = np.full(n_steps, step)
    if style.rubato:
        pos = np.arange(n_steps) / STEPS_PER_BAR
        wobble = np.sin(2 * np.pi * pos / rng.uniform(3, 7) + rng.uniform(0, 6.3))
        durations *= 1.0 + style.rubato * wobble + 0.3 * style.rubato * rng.standard_normal(n_steps // 16 + 1
                                                                                           ).repeat(16)[:n_steps]
    times = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
    idx = np.arange(n_steps)
    times += np.where(idx % 4 == 2, style.swing8 * 4 * durations, 0.0)
    times += np.where(idx % 2 == 1, style.swing16 * durations, 0.0)
    times += rng.normal(0.0, style.humanise_ms / 1000.0, n_steps)
    return np.maximum(times, 0.0)


def _chord_tones(root_degree: int, scale: tuple[int, ...], voicing: str) -> list[int]:
    """Semitones above the key of the chord built on a scale degree."""
    def degree(d: int) -> int:
        return scale[d % 7] + 12 * (d // 7)
    if voicing == "power":
        return [degree(root_degree), degree(root_degree) + 7, degree(root_degree) + 12]
    if voicing == "seventh":
        return [degree(root_degree + i) for i in (0, 2, 4, 6)]
    if voicing == "open":
        return [degree(root_degree), degree(root_degree + 4), degree(root_degree + 9), degree(root_degree + 11)]
    return [degree(root_degree + i) for i in (0, 2, 4)]


def _fit_register(semitone: int, key: int, register: tuple[int, int]) -> int:
    """The MIDI note of a pitch class nearest the bottom third of the part's register."""
    lo, hi = register
    note = lo + ((key + semitone - lo) % 12)
    note += 12 * ((semitone // 12) if semitone >= 12 else 0)
    while note > hi:
        note -= 12
    return note


def _onsets(rhythm: str) -> list[tuple[int, int]]:
    """(step, length in steps) of each 'x' in a bar pattern; '-' extends the previous note."""
    out = []
    for i, ch in enumerate(rhythm):
        if ch == "x":
            length = 1
            while i + length < len(rhythm) and rhythm[i + length] == "-":
                length += 1
            out.append((i, length))
    return out


def render_track(style: Style, seconds: float, sample_rate: int, channels: int,
                 rng: np.random.Generator) -> np.ndarray:
    """A whole track, float32 (frames, channels), peak below 1."""
    n = int(round(seconds * sample_rate))
    sr = sample_rate
    bpm = rng.uniform(*style.bpm)
    key = int(rng.integers(0, 12))
    scale = SCALES[style.scale]
    bar_seconds = 240.0 / bpm
    n_bars = int(np.ceil(seconds / bar_seconds * (1 + style.rubato * 2))) + 1
    times = _step_times(n_bars * STEPS_PER_BAR, bpm, style, rng)
    starts = (times * sr).astype(np.int64)
    step_seconds = 60.0 / bpm / 4.0

    # Sections of 4 or 8 bars; each picks a progression, pattern variants and which parts play.
    sections = []
    bar = 0
    while bar < n_bars:
        length = int(rng.choice([4, 8]))
        breakdown = bar > 0 and rng.random() < style.breakdown_probability
        sections.append(dict(
            first=bar, bars=length, breakdown=breakdown,
            progression=style.progressions[rng.integers(len(style.progressions))],
            variant=int(rng.integers(0, 1 << 16)),
            parts=[rng.random() < p.presence for p in style.parts]))
        bar += length
    # The track opens sparse (intro): no lead in the first section.
    sections[0]["parts"][-1] = False

    notes = NoteRenderer(Wavetables(sr, tilt=rng.normal(0.0, 0.15)), rng.uniform(0.75, 1.35), rng)
    mix = np.zeros((n, 2), dtype=np.float32)

    def add(bus: np.ndarray, at: int, clip: np.ndarray) -> None:
        if at >= len(bus):
            return
        end = min(len(bus), at + len(clip))
        bus[at:end] += clip[: end - at]

    def to_mix(bus: np.ndarray, level_db: float, pan: float) -> None:
        gain = 10 ** ((level_db + rng.normal(0, 1.5)) / 20)
        mix[:, 0] += bus * (gain * np.sqrt(0.5 * (1 - pan)))
        mix[:, 1] += bus * (gain * np.sqrt(0.5 * (1 + pan)))

    # --- drums
    if style.drums:
        drum_bus = np.zeros(n, dtype=np.float32)
        for inst, patterns in style.drums.items():
            shot = drum_one_shot(inst, style.kit[inst], sr, rng)
            shot /= max(1e-6, float(np.abs(shot).max()))
            inst_bus = np.zeros(n, dtype=np.float32)
            for sec in sections:
                if sec["breakdown"] and inst != "hat":
                    continue
                for b in range(sec["first"], min(n_bars, sec["first"] + sec["bars"])):
                    pattern = patterns[(sec["variant"] + b) % len(patterns)] if b % 2 else patterns[
                        sec["variant"] % len(patterns)]
                    last_bar = b == sec["first"] + sec["bars"] - 1
                    for i, ch in enumerate(pattern):
                        vel = {"x": 1.0, "o": 0.75, "g": 0.3}.get(ch, 0.0)
                        if last_bar and i >= 12 and inst in ("snare", "kick") and rng.random() < 0.5:
                            vel = max(vel, 0.6)           # a fill into the next section
                        if vel and rng.random() < 0.97:
                            add(inst_bus, int(starts[b * 16 + i]), shot * (vel * rng.uniform(0.85, 1.0)))
            drum_bus += inst_bus * (0.6 if inst in ("hat", "shaker", "ride", "crash") else 1.0)
        if style.drum_drive:
            drum_bus = np.tanh(style.drum_drive * drum_bus) / np.tanh(style.drum_drive)
        to_mix(drum_bus, style.drum_level_db, rng.uniform(-0.1, 0.1))

    # --- pitched parts
    for p_index, part in enumerate(style.parts):
        timbre = TIMBRES[part.timbre]
        bus = np.zeros(n, dtype=np.float32)
        melody_degree = int(rng.integers(0, 7))
        for sec in sections:
            if not sec["parts"][p_index]:
                continue
            rhythm = part.rhythms[sec["variant"] % len(part.rhythms)]
            for b in range(sec["first"], min(n_bars, sec["first"] + sec["bars"])):
                chord_degree = sec["progression"][(b - sec["first"]) % len(sec["progression"])]
                tones = _chord_tones(chord_degree, scale, part.voicing)
                for step, length in _onsets(rhythm):
                    s = b * 16 + step
                    if starts[s] >= n:
                        break
                    if part.mode == "melody":
                        if rng.random() > part.density:
                            continue
                        melody_degree += int(rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]))
                        melody_degree = int(np.clip(melody_degree, -3, 14))
                        pitches = [scale[melody_degree % 7] + 12 * (melody_degree // 7)]
                        length = int(rng.choice([1, 2, 2, 4])) * max(1, length)
                    elif part.mode == "walk":
                        # chord tone on the downbeat, scale or chromatic approach notes between
                        beat = step // 4
                        pitches = [tones[0] if beat == 0 else
                                   (tones[int(rng.integers(0, len(tones)))] + int(rng.choice([0, 0, 2, -1])))]
                    elif part.mode == "root":
                        pitches = [tones[0] + (12 if rng.random() < 0.15 else 0)]
                    elif part.mode == "drone":
                        pitches = [tones[0]]
                    else:
                        pitches = tones
                    gate_s = length * step_seconds * part.gate
                    velocity = rng.uniform(0.7, 1.0) * (1.0 if step % 4 == 0 else 0.85)
                    for semitone in pitches:
                        midi = _fit_register(int(semitone), key, part.register)
                        shot = notes.render(timbre, midi_hz(midi), gate_s)
                        add(bus, int(starts[s]), shot * (velocity / np.sqrt(len(pitches))))
        if not bus.any():
            continue
        if part.highpass:
            bus = _butter(bus, sr, "highpass", part.highpass * rng.uniform(0.8, 1.25))
        if part.lowpass:
            bus = _butter(bus, sr, "lowpass", part.lowpass * rng.uniform(0.7, 1.4))
        if part.distortion:
            drive = part.distortion * rng.uniform(0.7, 1.4)
            bus = np.tanh(drive * bus / max(1e-6, float(np.abs(bus).max()))) / np.tanh(drive)
        else:
            bus /= max(1e-6, float(np.abs(bus).max()))
        pan = 0.0 if p_index == 0 else rng.uniform(-0.6, 0.6)
        to_mix(bus, part.level_db, pan)

    # --- room, noise, loudness
    if style.reverb_wet:
        t60 = style.reverb_seconds * rng.uniform(0.8, 1.2)
        for ch in range(2):
            wet = reverb(mix[:, ch], sr, t60, rng)
            mix[:, ch] = (1 - style.reverb_wet) * mix[:, ch] + style.reverb_wet * wet
    rms = float(np.sqrt(np.mean(mix ** 2))) or 1.0
    target = 10 ** ((style.loudness_db + rng.uniform(-3, 3)) / 20)
    mix *= target / rms
    if style.hiss_db > -90:
        mix += (10 ** ((style.hiss_db + rng.uniform(-4, 4)) / 20)
                * rng.standard_normal(mix.shape).astype(np.float32))
    if style.crackle:
        clicks = rng.random(n) < style.crackle / sr
        mix[clicks] += rng.uniform(-0.3, 0.3, (int(clicks.sum()), 1)).astype(np.float32)
    # Fade in/out so cuts are not clicks; soft-limit peaks the way mastering does.
    fade = min(n // 4, int(0.05 * sr))
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)[:, None]
    mix[:fade] *= ramp
    mix[n - fade:] *= ramp[::-1]
    mix = np.tanh(mix * 1.1) * 0.93
    if channels == 1:
        return (mix @ np.array([0.5, 0.5], dtype=np.float32))[:, None]
    return mix
