"""The token estimate used when a server reports no usage, against real tokenizer counts.

The counts were made with OpenAI's cl100k_base and o200k_base encodings; an estimate must
land within 15 % of the range they span (four characters a token missed Chinese and
Japanese by a factor of three to four).
"""

from __future__ import annotations

import pytest

from app.llm.base import estimate_tokens

TEXTS = {
    "en": ("Event sourcing stores every change to an application's state as an immutable "
           "sequence of events. Instead of overwriting rows, the system appends facts, which "
           "can be replayed to rebuild any past state. This makes audit trails, debugging and "
           "temporal queries straightforward, at the cost of more storage and careful schema "
           "evolution.", 61, 62),
    "fr": ("La journalisation des événements enregistre chaque modification de l'état d'une "
           "application sous la forme d'une séquence immuable d'événements. Au lieu d'écraser "
           "des lignes, le système ajoute des faits, qui peuvent être rejoués pour reconstruire "
           "n'importe quel état passé.", 59, 70),
    "ru": ("Событийное хранение сохраняет каждое изменение состояния приложения как "
           "неизменяемую последовательность событий. Вместо перезаписи строк система "
           "добавляет факты, которые можно воспроизвести для восстановления любого прошлого "
           "состояния.", 46, 82),
    "zh": ("事件溯源将应用程序状态的每一次变化存储为不可变的事件序列。系统不是覆盖行，而是追加"
           "事实，这些事实可以被重放以重建任何过去的状态。这使得审计跟踪、调试和时间查询变得简单。",
           61, 84),
    "ja": ("イベントソーシングは、アプリケーションの状態に対するすべての変更を、不変のイベントの"
           "列として保存します。行を上書きする代わりに、システムは事実を追記し、それを再生して"
           "過去の任意の状態を再構築できます。", 71, 109),
    "numbers": ("The totals were 12345, 67890 and 3.14159; on 2026-12-01 at 03:10:37 UTC the "
                "count reached 1,234,567.", 43, 43),
    "emoji": ("Great job 🎉🎉! See you tomorrow 👋 — ok? 😀😀😀", 18, 22),
}


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_the_estimate_is_close_to_real_tokenizers(name: str) -> None:
    text, o200k, cl100k = TEXTS[name]
    low, high = min(o200k, cl100k) * 0.85, max(o200k, cl100k) * 1.15
    assert low <= estimate_tokens([text]) <= high


def test_no_text_is_no_token() -> None:
    assert estimate_tokens([]) == 0
    assert estimate_tokens(["", ""]) == 0
    assert estimate_tokens(["a"]) == 1
