"""Chat prompts shared by the decoder tests: a one-fact question and an open story."""

QA = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "Context: The Eiffel Tower is 330 metres tall.\n"
                                "Question: How tall is the Eiffel Tower?"},
]
STORY = [{"role": "user", "content": "Write a short story about a cat."}]
