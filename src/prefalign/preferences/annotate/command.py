"""`prefalign annotate`: its options (flags or `--config` YAML) and what it runs."""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.config import Section, option, require

DESCRIPTION = ("Rank each prompt's candidate completions by hand, best first, and write every "
               "pair the ranking implies: in the terminal, or with --serve on a local web page "
               "for several annotators at once (labels per annotator, OUTPUT with the name "
               "before the suffix). Progress is saved after every item; the same command "
               "again continues where it stopped.")


@dataclass(frozen=True)
class AnnotationOptions(Section):
    SECTION = "annotation"

    input: str | None = option(None, "rows with prompt and candidates (JSONL, JSON, Parquet, "
                               "...); required")
    output: str | None = option(None, "JSONL of preference pairs; OUTPUT.progress.json records "
                                "progress (with --serve: one of each per annotator, "
                                "named before the suffix: human.alice.jsonl for human.jsonl); "
                                "required")
    select: str = option("all", "items to ask about: all; random (seeded by --seed); "
                         "uncertain: where a pairwise judge flipped most or was least "
                         "confident, read from --judgments", choices=("all", "random",
                                                                      "uncertain"))
    limit: int | None = option(None, "ask about at most this many items")
    judgments: str | None = option(None, "OUTPUT.judgments.jsonl of `prefalign judge --mode "
                                   "pairwise` run on this same input (for --select uncertain)")
    seed: int = option(0, "seed of --select random and of the items --overlap doubles")

    def validate(self) -> None:
        require(self.input is not None, "input", "is required: give --input FILE")
        require(self.output is not None, "output", "is required: give --output FILE")
        require(self.limit is None or self.limit >= 1, "limit", "must be 1 or more items")
        super().validate()


@dataclass(frozen=True)
class WebOptions(Section):
    SECTION = "web"

    serve: bool = option(False, "serve a web page on which several annotators rank at once, "
                         "instead of asking in the terminal")
    host: str = option("127.0.0.1", "address the page is served on; 0.0.0.0 opens it to the "
                       "network (the printed URL's token is still required)")
    port: int = option(8000, "port of the page; 0 takes a free one")
    overlap: float = option(0.0, "fraction of the items that go to two annotators (drawn with "
                            "--seed), for measuring agreement; the rest go to one")
    guidelines: str | None = option(None, "text file shown on the page as the annotation "
                                    "guidelines")

    def validate(self) -> None:
        require(0 <= self.overlap <= 1, "overlap", "must be in [0, 1]")
        require(0 <= self.port <= 65535, "port", "must be in [0, 65535]")
        if not self.serve:
            for name, default in (("host", "127.0.0.1"), ("port", 8000), ("overlap", 0.0),
                                  ("guidelines", None)):
                require(getattr(self, name) == default, name, "is an option of the web page: "
                        "add --serve")
        super().validate()


@dataclass(frozen=True)
class AnnotateConfig(AnnotationOptions, WebOptions):
    COMMAND = "annotate"


def run_annotate(config: AnnotateConfig) -> int:
    if config.serve:
        from prefalign.preferences.annotate.server import serve

        serve(config)
    else:
        from prefalign.preferences.annotate.terminal import annotate

        annotate(config.input, config.output, select=config.select, limit=config.limit,
                 judgments=config.judgments, seed=config.seed)
    return 0
