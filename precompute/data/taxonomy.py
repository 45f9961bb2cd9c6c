"""One harm taxonomy for every harmful dataset (docs/science.md "Harm taxonomy").

Each benchmark names its harms its own way: HarmBench's `cybercrime_intrusion`, JailbreakBench's
`Malware/Hacking` and StrongREJECT's `Non-violent crimes` overlap, and a score that compares "one
category" with benign text would otherwise treat them as three unrelated categories, some of them
too small to test. Harmful documents therefore carry a unified category (documents.parquet
`category`) next to the one their dataset gave (`category_source`).

The set follows the hazard groups that the public taxonomies share (MLCommons AILuminate, Llama
Guard, the JailbreakBench categories) as far as the shipped datasets can fill them, ten categories
plus a fallback. A dataset label is mapped as a whole; where a dataset's label mixes several
harms (StrongREJECT's "Non-violent crimes" holds malware, fraud and privacy prompts) it goes to the
category most of its prompts belong to, or to `illegal_other`, and a label that names a dataset
rather than a harm ("advbench", "hh_rlhf_red_team") goes to the fallback `unspecified`, as does
any label this table does not know.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger(__name__)

# The unified categories, with what each holds.
CATEGORIES: dict[str, str] = {
    "violence_weapons": "violence against people or animals, terrorism, weapons used to hurt, chemical "
    "and biological weapons",
    "cybercrime": "malware, hacking, intrusion into computers and networks",
    "fraud_deception": "fraud, scams, financial crime, forgery, plagiarism",
    "illegal_goods": "drugs, weapons trade and manufacture, contraband, counterfeit goods",
    "hate_harassment": "hate speech, discrimination, harassment, bullying, toxic or offensive content",
    "sexual": "sexual content and sexual exploitation",
    "self_harm": "suicide, self-injury, eating disorders",
    "misinformation": "disinformation, misinformation, conspiracy theories",
    "privacy_surveillance": "privacy violations, personal data, tracking and surveillance",
    "illegal_other": "other crime and regulated activity: mixed non-violent crime, unlicensed expert "
    "advice, government decision-making, copyright",
}
UNSPECIFIED = "unspecified"  # the fallback: mixed-harm datasets and labels the table does not know


def _key(label: str) -> str:
    """Case and punctuation do not distinguish labels: `Sexual/Adult content` = `sexual_adult_content`."""
    return re.sub(r"[^0-9a-z]+", "_", label.casefold()).strip("_")


# Every label of the configured datasets (tests/precompute/data/test_taxonomy.py reads the real files),
# keyed by `_key`, grouped by dataset. A unified name maps to itself, so mapping is idempotent.
_TABLE: dict[str, tuple[tuple[str, str], ...]] = {
    "unified": tuple((c, c) for c in (*CATEGORIES, UNSPECIFIED)),
    # HarmBench `SemanticCategory`
    "harmbench": (
        ("chemical_biological", "violence_weapons"),
        ("cybercrime_intrusion", "cybercrime"),
        ("harassment_bullying", "hate_harassment"),
        ("misinformation_disinformation", "misinformation"),
        ("illegal", "illegal_other"),  # smuggling, theft, hitmen, tax fraud...: mixed crime
        ("copyright", "illegal_other"),
        ("harmful", UNSPECIFIED),  # HarmBench's catch-all: graphic violence, dangerous advice, porn...
    ),
    # StrongREJECT `category`
    "strongreject": (
        ("Disinformation and deception", "misinformation"),
        ("Hate, harassment and discrimination", "hate_harassment"),
        ("Illegal goods and services", "illegal_goods"),
        ("Non-violent crimes", "illegal_other"),  # malware, fraud, privacy and theft in one label
        ("Sexual content", "sexual"),
        ("Violence", "violence_weapons"),
    ),
    # JailbreakBench JBB-Behaviors `Category` (harmful and benign files alike)
    "jailbreakbench": (
        ("Harassment/Discrimination", "hate_harassment"),
        ("Malware/Hacking", "cybercrime"),
        ("Physical harm", "violence_weapons"),
        ("Economic harm", "fraud_deception"),  # extortion, gambling, counterfeiting, insider trading
        ("Fraud/Deception", "fraud_deception"),
        ("Disinformation", "misinformation"),
        ("Sexual/Adult content", "sexual"),
        ("Privacy", "privacy_surveillance"),
        ("Expert advice", "illegal_other"),
        ("Government decision-making", "illegal_other"),
    ),
    # Do-Not-Answer risk areas: the names configs/demo.toml gives its files, and the paper's own
    "donotanswer": (
        ("malicious_uses", "illegal_other"),  # assisting illegal activity of every kind
        ("Malicious Uses", "illegal_other"),
        ("information_hazard", "privacy_surveillance"),  # 248 of 262 intents are private/personal data
        ("Information Hazards", "privacy_surveillance"),
        ("discrimination_toxicity", "hate_harassment"),
        ("Discrimination, Exclusion, Toxicity, Hateful, Offensive", "hate_harassment"),
        ("misinformation", "misinformation"),
        ("Misinformation Harms", "misinformation"),
    ),
    # XSTest unsafe prompts, by `type` (the contrast sets of the safe types)
    "xstest": (
        ("contrast_homonyms", "violence_weapons"),
        ("contrast_figurative_language", "violence_weapons"),
        ("contrast_safe_targets", "violence_weapons"),
        ("contrast_safe_contexts", "violence_weapons"),  # killing, bombing; a few thefts
        ("contrast_definitions", "violence_weapons"),  # murder, terrorism; five drug prompts
        ("contrast_discr", "hate_harassment"),
        ("contrast_historical_events", "hate_harassment"),  # denying or repeating atrocities
        ("contrast_privacy", "privacy_surveillance"),
        ("xstest_unsafe", UNSPECIFIED),
    ),
    # datasets that carry one label naming the dataset, not a harm
    "single_label": (
        ("advbench", UNSPECIFIED),
        ("hh_rlhf_red_team", UNSPECIFIED),
    ),
}
TAXONOMY: dict[str, str] = {_key(label): unified for rows in _TABLE.values() for label, unified in rows}
_warned: set[str] = set()


def unify(label: Any) -> str:
    """The unified category of a dataset's harm label; `unspecified` for none or an unknown one (logged
    once per label, so a new dataset's labels can be added to the table)."""
    if label is None or (isinstance(label, float) and label != label):
        return UNSPECIFIED
    text = str(label)
    unified = TAXONOMY.get(_key(text))
    if unified is None:
        if text not in _warned:
            _warned.add(text)
            log.warning(
                "harm category %r is not in the taxonomy (precompute/data/taxonomy.py); it counts as %r",
                text,
                UNSPECIFIED,
            )
        return UNSPECIFIED
    return unified


def known(label: str) -> bool:
    """Whether the table names this label (the fallback is not a mapping)."""
    return _key(label) in TAXONOMY
