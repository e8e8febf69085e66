"""Answer normalization of the EvalAI VQA processor, as LLaVA's TextVQA scorer (m4c evaluator)
and VQAv2 submission converter apply it.

Provenance: the tables below (contractions, number words, articles, punctuation) are the standard
VQA / EvalAI answer-normalization tables, the same ones MMF's m4c TextVQA evaluator uses.

Steps, in order: lower-case; drop "," and "?"; split "'s" off into " 's"; newlines/tabs to
spaces; for each punctuation mark in `PUNCTUATION`: delete it everywhere if it touches a space
somewhere in the text, else turn it into a space; delete "." not followed by a digit (at most
32 of them: the reference passes `re.UNICODE` where `re.sub` expects its count argument);
number words zero..ten and "none" to digits; drop articles; restore missing apostrophes of
common contractions. Colons, apostrophes, "*", "#", "%", "&", "$" are kept, as in the reference.
"""
from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

# Written as without-apostrophe=with-apostrophe. Only lower-case keys can match (the text is
# lower-cased first); "somebody'd=somebodyd" is reversed in the reference and kept so.
CONTRACTIONS = dict(
    pair.split("=", 1)
    for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
    maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
    mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
    ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
    she'dve=she'd've shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
    shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
    somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
    someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
    somethingd=something'd somethingd've=something'd've something'dve=something'd've
    somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
    therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
    theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
    we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's
    whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
    whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll
    whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
    wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
    y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've
    youll=you'll youre=you're youve=you've
    """.split()
)

_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = 32


def _strip_punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def _normalize_words(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """Normalize one answer string the way the EvalAI VQA processor does."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _normalize_words(_strip_punctuation(text))


def soft_scores(gt_answers: list[str]) -> dict[str, float]:
    """VQA soft score of each distinct normalized ground-truth answer: the mean over the
    leave-one-out subsets of the human answers of min(1, matches / 3)."""
    normalized = [normalize_answer(a) for a in gt_answers]
    n = len(normalized)
    scores = {}
    for candidate in set(normalized):
        total = 0.0
        for left_out in range(n):
            matches = sum(1 for i, a in enumerate(normalized) if i != left_out and a == candidate)
            total += min(1.0, matches / 3)
        scores[candidate] = total / n
    return scores
