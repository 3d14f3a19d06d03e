"""Image-format header signatures (placeholder; being written)."""

KNOWN_FORMATS: frozenset[str] = frozenset(
    {
        "qcow2",
        "qcow",
        "vmdk",
        "vdi",
        "vpc",
        "vhdx",
        "qed",
        "parallels",
        "bochs",
        "luks",
        "cloop",
        "cow",
        "ploop",
    }
)
