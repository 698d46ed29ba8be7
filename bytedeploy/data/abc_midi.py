"""Paired ABC / MIDI files for bGPT's conversion task (arXiv 2402.19155, ABC -> MIDI), made offline.

random_tune(rng) writes a short tune in ABC notation (3 to 4 bars by default): a key (major and minor keys up to
three sharps or flats), a meter (2/4, 3/4, 4/4, 6/8), a unit note length (1/8 or 1/4), notes of several lengths
(half a unit to four units, dotted values included) and rests that fill every bar exactly, a chord at the start of
some bars (a triad on the key's I, IV, V or vi, written [ceg]) and, in about half the tunes, a repeat (|: ... :|).
The same seed gives the same tunes.

abc_to_midi(abc) converts a tune with music21 (a maintained music toolkit that reads ABC and writes MIDI without a
network): music21 applies the key signature to the notes and chords and writes the repeat out in full
(expandRepeats: the notes a listener hears, so the MIDI side carries the repeat). The chords are note chords
([ceg]), not chord symbols ("C"): music21 10.5 writes chord symbols to MIDI at wrong offsets once a tune repeats.
midi_notes(data) reads a MIDI file back into its notes (onset and length in quarter notes, MIDI pitch), which is
how a generated MIDI file is checked against its reference: it must parse, and its notes must equal the reference's.

write_pairs(folder, n, seed) writes tune_{i}.abc and tune_{i}.mid side by side, the layout that
`bytedeploy train bgpt --conversion 'abc->mid'` pairs by name.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from bytedeploy.errors import UserError

KEYS = ("C", "G", "D", "A", "F", "Bb", "Eb", "Am", "Em", "Bm", "Dm", "Gm")
METERS = {"2/4": Fraction(2, 4), "3/4": Fraction(3, 4), "4/4": Fraction(4, 4), "6/8": Fraction(6, 8)}
UNIT_LENGTHS = (Fraction(1, 8), Fraction(1, 4))
LENGTHS = (Fraction(1, 2), Fraction(1), Fraction(3, 2), Fraction(2), Fraction(3), Fraction(4))  # in units
PITCHES = ("C", "D", "E", "F", "G", "A", "B", "c", "d", "e", "f", "g", "a", "b")  # two octaves from middle C
LETTERS = "CDEFGAB"
CHORD_DEGREES = (0, 3, 4, 5)  # I, IV, V, vi of the key's scale (minor keys: i, iv, v, VI)
REST_PROBABILITY = 0.08
CHORD_PROBABILITY = 0.5
REPEAT_PROBABILITY = 0.5
MIN_BARS = 3  # music21 groups a tune into measures (which its repeat expansion needs) from three bars on


def abc_length(length: Fraction) -> str:
    """A note length in units -> its ABC suffix: 1 -> '', 2 -> '2', 1/2 -> '/2', 3/2 -> '3/2'."""
    if length == 1:
        return ""
    if length.denominator == 1:
        return str(length.numerator)
    return f"{length.numerator if length.numerator != 1 else ''}/{length.denominator}"


def abc_pitch(step: int) -> str:
    """Diatonic step from middle C -> ABC pitch: 0 -> 'C', 7 -> 'c', 14 -> "c'"."""
    octave, letter = divmod(step, 7)
    return LETTERS[letter] if octave == 0 else LETTERS[letter].lower() + "'" * (octave - 1)


def triad(key: str, degree: int) -> str:
    """The triad on a degree of the key as an ABC chord from middle C up: ('G', 3) -> '[ceg]'. Plain letters:
    the key signature makes the chord diatonic (F sharp in G, B flat in F, ...)."""
    root = LETTERS.index(key[0]) + degree
    return "[" + "".join(abc_pitch(root + step) for step in (0, 2, 4)) + "]"


def random_bar(rng: np.random.Generator, units: Fraction) -> list[str]:
    """Notes and rests whose lengths add up to exactly `units`."""
    out, left = [], units
    while left > 0:
        choices = [n for n in LENGTHS if n <= left]
        length = choices[int(rng.integers(len(choices)))]
        symbol = "z" if rng.random() < REST_PROBABILITY else PITCHES[int(rng.integers(len(PITCHES)))]
        out.append(symbol + abc_length(length))
        left -= length
    return out


def random_tune(rng: np.random.Generator, index: int = 1, min_bars: int = MIN_BARS, max_bars: int = 4) -> str:
    """One ABC tune (see the module docstring), ending with a newline."""
    key = KEYS[int(rng.integers(len(KEYS)))]
    meter = list(METERS)[int(rng.integers(len(METERS)))]
    unit = UNIT_LENGTHS[int(rng.integers(len(UNIT_LENGTHS)))]
    bar_units = METERS[meter] / unit
    bars = []
    for _ in range(int(rng.integers(min_bars, max_bars + 1))):
        notes = random_bar(rng, bar_units)
        if rng.random() < CHORD_PROBABILITY:  # the bar's first note (or rest) becomes a triad of the same length
            chord = triad(key, CHORD_DEGREES[int(rng.integers(len(CHORD_DEGREES)))])
            notes[0] = chord + notes[0].lstrip("zCDEFGABcdefgab")
        bars.append(" ".join(notes))
    body = " | ".join(bars)
    body = f"|: {body} :|" if rng.random() < REPEAT_PROBABILITY else f"| {body} |]"
    header = [f"X:{index}", f"T:Tune {index}", f"M:{meter}", f"L:{unit.numerator}/{unit.denominator}", f"K:{key}"]
    return "\n".join(header + [body]) + "\n"


def abc_to_midi(abc: str) -> bytes:
    """An ABC tune -> the bytes of a standard MIDI file, written by music21."""
    import music21

    try:
        score = music21.converter.parse(abc, format="abc").expandRepeats()
    except (music21.converter.ConverterException, music21.exceptions21.StreamException) as e:
        raise UserError(f"music21 cannot convert this ABC tune: {e}") from None
    return music21.midi.translate.streamToMidiFile(score).writestr()


def midi_notes(data: bytes) -> list[tuple[float, int, float]]:
    """The notes of a MIDI file as sorted (onset, MIDI pitch, length), times in quarter notes (chords give one
    entry per pitch). Raises ValueError (or music21's own errors) when the bytes are not a readable MIDI file."""
    import music21

    midi = music21.midi.MidiFile()
    midi.readstr(data)
    score = music21.midi.translate.midiFileToStream(midi)
    notes = []
    for n in score.flatten().notes:
        for pitch in n.pitches:
            notes.append((float(n.offset), pitch.midi, float(n.quarterLength)))
    return sorted(notes)


def parse_midi(data: bytes) -> list[tuple[float, int, float]] | None:
    """midi_notes, or None when the bytes do not parse as MIDI (a generated file may be anything)."""
    try:
        return midi_notes(data)
    except Exception:  # noqa: BLE001 - music21 raises many kinds of error on malformed files; all mean "no parse"
        return None


def write_pairs(folder, n: int, seed: int = 0, min_bars: int = MIN_BARS, max_bars: int = 4) -> list[Path]:
    """tune_{i}.abc and tune_{i}.mid for i < n under folder (created); the same seed writes the same files.
    -> the .abc paths."""
    if n < 1 or not MIN_BARS <= min_bars <= max_bars:
        raise UserError(f"need n >= 1 tunes and {MIN_BARS} <= min_bars <= max_bars, got {n}, {min_bars}, {max_bars}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        abc = random_tune(rng, i + 1, min_bars, max_bars)
        path = folder / f"tune_{i}.abc"
        path.write_text(abc, encoding="utf-8")
        path.with_suffix(".mid").write_bytes(abc_to_midi(abc))
        paths.append(path)
    return paths
