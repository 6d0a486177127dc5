"""Output vocabularies: `tokenizer_source: base | union | <model>` and mergekit's `tokenizer:` block.

At plan time (`build.plan_vocabulary`) the output tokenizer is built from the inputs' tokenizer files and,
for each input model, an index tensor maps every output row to that model's row (-1 where the model lacks
the token). The executor gathers rows with it (`embed.merge_vocab_rows`): a token one model has takes
that model's row, a token several have takes the merge method applied to those models' rows, a token none
has (and every padding row) takes the mean row, and `tokens:` entries take the row they name.
"""

from mergesmith.tokenizer.build import VocabularyPlan, plan_vocabulary

__all__ = ["VocabularyPlan", "plan_vocabulary"]
