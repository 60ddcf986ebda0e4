"""Generation behaviours of the MUDD decoders, in our own words.

transformers' `GenerationTesterMixin` (tests/generation/test_utils.py) is not in the sdist. `GenerationBehaviours`
takes its place for the decoder testers (`transformers_common.py` installs it under the mixin's name, so
`ModelTesterMixin.test_generation_tester_mixin_inheritance` sees it) and checks the same features, each against an
independent reference:

* greedy search, sampling and beam search against loops written here over full forward passes without a cache;
* left-padded batches against each prompt alone; `use_cache=False`, `DynamicCache` and `StaticCache` against each
  other; continuing from returned `past_key_values` against generating from the whole text;
* `inputs_embeds` against `input_ids`; assisted decoding and prompt-lookup decoding against plain greedy search;
* a muddified plain model of the family (GPT-NeoX / Llama) against that plain model for greedy, sampling, beam
  search, beam sampling, the static cache and prompt-lookup sampling (the tester's `plain_model()`);
* hidden states and attentions returned by `generate` against a full forward pass; `logits_to_keep`;
* the "text-generation" pipeline against `generate`.

The models get random, non-identity weights (`mudd_reference.randomize_`), so every dense connection matters.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, pipeline
from transformers.cache_utils import StaticCache

from mudd_reference import randomize_


MAX_NEW = 6


class GenerationBehaviours:
    """Mixin for a `unittest.TestCase` with `model_tester` (tiny config, `vocab_size`) and `all_model_classes`.

    The tester must provide `plain_model(seed)` returning a random transformers model of the family in eval mode
    whose `muddify` result computes the same function.
    """

    def _model(self, model_class, seed: int = 0, **config_overrides):
        config = self.model_tester.get_config()
        for key, value in config_overrides.items():
            setattr(config, key, value)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = model_class(config).eval()
        randomize_(model, seed=seed)
        return model

    def _prompts(self, batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(3, self.model_tester.vocab_size, (batch, length), generator=generator)

    @staticmethod
    def _kwargs(**extra):
        # no EOS: every row generates exactly MAX_NEW tokens, so the references need no stopping logic
        kwargs = dict(max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0, min_new_tokens=None)
        kwargs.update(extra)
        return kwargs

    @staticmethod
    def _next_logits(model, ids: torch.Tensor) -> torch.Tensor:
        """Last-position logits of a full forward pass without a cache (the references below use nothing else)."""
        with torch.no_grad():
            return model(ids, use_cache=False).logits[:, -1].float()

    # ------------------------------------------------------------------ search strategies

    def test_greedy_generate_matches_argmax_loop(self):
        for model_class in self.all_generative_model_classes:
            model, ids = self._model(model_class), self._prompts()
            got = model.generate(ids, do_sample=False, **self._kwargs())
            expected = ids
            for _ in range(MAX_NEW):
                expected = torch.cat([expected, self._next_logits(model, expected).argmax(-1, keepdim=True)], -1)
            self.assertTrue(torch.equal(got, expected), f"{model_class.__name__}: {got} != {expected}")

    def test_sample_generate_matches_multinomial_loop(self):
        # temperature 0.7 and top-k 5: the logits processors change the distribution, and both must be applied
        for model_class in self.all_generative_model_classes:
            model, ids = self._model(model_class), self._prompts()
            torch.manual_seed(11)
            got = model.generate(ids, do_sample=True, temperature=0.7, top_k=5, top_p=1.0, **self._kwargs())
            torch.manual_seed(11)
            expected = ids
            for _ in range(MAX_NEW):
                logits = self._next_logits(model, expected) / 0.7
                kth = logits.topk(5, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(-1), num_samples=1)
                expected = torch.cat([expected, token], -1)
            self.assertTrue(torch.equal(got, expected), f"{model_class.__name__}: {got} != {expected}")

    def test_beam_search_matches_exhaustive_beam_loop(self):
        num_beams = 3
        for model_class in self.all_generative_model_classes:
            model, ids = self._model(model_class), self._prompts()
            got = model.generate(ids, do_sample=False, num_beams=num_beams, length_penalty=1.0, **self._kwargs())
            for row in range(ids.shape[0]):
                # beams: (summed log-probability, sequence); without EOS all finish at the same length, so the best
                # final beam is the one with the highest summed log-probability
                beams = [(0.0, ids[row])]
                for _ in range(MAX_NEW):
                    candidates = []
                    for score, sequence in beams:
                        log_probs = self._next_logits(model, sequence[None]).log_softmax(-1)[0]
                        top = log_probs.topk(num_beams)
                        candidates += [
                            (score + value.item(), torch.cat([sequence, index.view(1)]))
                            for value, index in zip(top.values, top.indices)
                        ]
                    beams = sorted(candidates, key=lambda item: -item[0])[:num_beams]
                self.assertTrue(torch.equal(got[row], beams[0][1]), f"{model_class.__name__} row {row}")

    def test_generate_of_muddified_plain_model_matches_plain_model(self):
        """A muddified GPT-NeoX / Llama is the same function: transformers' own generation of the plain model is the
        reference for greedy, sampling and beam search (same seed)."""
        from modeling_muddpythia import muddify

        plain = self.plain_model(seed=5)
        mudd = muddify(plain)
        ids = self._prompts(seed=5)
        for options in (
            dict(do_sample=False),
            dict(do_sample=True, top_k=4),
            dict(do_sample=False, num_beams=3),
            dict(do_sample=True, num_beams=2, top_k=4),  # beam sampling
            dict(do_sample=False, cache_implementation="static"),
            dict(do_sample=True, top_k=4, prompt_lookup_num_tokens=2),  # speculative sampling (batch size 1 only)
        ):
            prompts = ids[:1].repeat(1, 2) if "prompt_lookup_num_tokens" in options else ids
            outputs = []
            for model in (plain, mudd):
                torch.manual_seed(3)
                outputs.append(model.generate(prompts, **self._kwargs(**options)))
            self.assertTrue(torch.equal(*outputs), f"{options}: {outputs[0]} != {outputs[1]}")

    # ------------------------------------------------------------------ padding, caches, inputs

    def test_left_padded_batch_matches_each_prompt_alone(self):
        for model_class in self.all_generative_model_classes:
            model = self._model(model_class)
            generator = torch.Generator().manual_seed(2)
            prompts = [torch.randint(3, self.model_tester.vocab_size, (n,), generator=generator) for n in (7, 3, 5)]
            longest = max(len(p) for p in prompts)
            ids = torch.stack([torch.cat([torch.zeros(longest - len(p), dtype=torch.long), p]) for p in prompts])
            mask = torch.stack([torch.cat([torch.zeros(longest - len(p)), torch.ones(len(p))]) for p in prompts])
            for options in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
                batched = model.generate(ids, attention_mask=mask.long(), **self._kwargs(**options))[:, longest:]
                for row, prompt in enumerate(prompts):
                    alone = model.generate(prompt[None], **self._kwargs(**options))[0, len(prompt) :]
                    self.assertTrue(torch.equal(batched[row], alone), f"{model_class.__name__} {options} row {row}")

    def test_generate_with_each_cache_gives_the_same_tokens(self):
        for model_class in self.all_generative_model_classes:
            model, ids = self._model(model_class), self._prompts()
            reference = model.generate(ids, do_sample=False, use_cache=False, **self._kwargs())
            dynamic = model.generate(ids, do_sample=False, **self._kwargs(return_dict_in_generate=True))
            self.assertIsInstance(dynamic.past_key_values, DynamicCache)
            static = model.generate(
                ids, do_sample=False, cache_implementation="static", **self._kwargs(return_dict_in_generate=True)
            )
            self.assertIsInstance(static.past_key_values, StaticCache)
            self.assertTrue(torch.equal(dynamic.sequences, reference), model_class.__name__)
            self.assertTrue(torch.equal(static.sequences, reference), model_class.__name__)
            # a StaticCache passed in by the caller
            cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + MAX_NEW)
            given = model.generate(ids, do_sample=False, past_key_values=cache, **self._kwargs())
            self.assertTrue(torch.equal(given, reference), model_class.__name__)

    def test_scores_equal_logits_of_full_forward(self):
        for model_class in self.all_generative_model_classes:
            model, ids = self._model(model_class), self._prompts()
            out = model.generate(
                ids, do_sample=False, **self._kwargs(return_dict_in_generate=True, output_logits=True)
            )
            self.assertEqual(len(out.logits), MAX_NEW)
            with torch.no_grad():
                full = model(out.sequences, use_cache=False).logits
            length = ids.shape[1]
            for step, logits in enumerate(out.logits):
                torch.testing.assert_close(logits, full[:, length + step - 1], rtol=1e-4, atol=1e-4)

    def test_generate_returns_hidden_states_and_attentions_of_each_step(self):
        for model_class in self.all_generative_model_classes:
            model, ids = self._model(model_class), self._prompts()
            out = model.generate(
                ids, do_sample=False,
                **self._kwargs(return_dict_in_generate=True, output_hidden_states=True, output_attentions=True),
            )
            self.assertEqual((len(out.hidden_states), len(out.attentions)), (MAX_NEW, MAX_NEW))
            with torch.no_grad():
                full = model(out.sequences[:, :-1], use_cache=False, output_hidden_states=True, output_attentions=True)
            length = ids.shape[1]
            for step in (0, MAX_NEW - 1):  # the prompt step, and a one-token step with the cache
                positions = slice(0, length) if step == 0 else slice(length + step - 1, length + step)
                for got, expected in zip(out.hidden_states[step], full.hidden_states):
                    torch.testing.assert_close(got, expected[:, positions], rtol=1e-4, atol=1e-4)
                for got, expected in zip(out.attentions[step], full.attentions):
                    torch.testing.assert_close(got, expected[:, :, positions, : positions.stop], rtol=1e-4, atol=1e-4)

    def test_logits_to_keep(self):
        for model_class in self.all_generative_model_classes:
            model, ids = self._model(model_class), self._prompts()
            with torch.no_grad():
                full = model(ids).logits
                torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:])
                torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 3])).logits, full[:, [0, 3]])

    def test_continue_from_past_key_values(self):
        """Generate, append a user turn to the output, continue with the returned cache: same tokens as generating
        from the whole text without a cache (a `DynamicCache`, and a `StaticCache` the caller made large enough)."""
        for model_class in self.all_generative_model_classes:
            for static in (False, True):
                model, ids = self._model(model_class), self._prompts()
                cache = StaticCache(config=model.config, max_cache_len=32) if static else None
                first = model.generate(
                    ids, do_sample=False, past_key_values=cache,
                    **self._kwargs(return_dict_in_generate=True, max_new_tokens=3),
                )
                self.assertIsInstance(first.past_key_values, StaticCache if static else DynamicCache)
                turn = torch.cat([first.sequences, self._prompts(length=3, seed=9)], -1)
                continued = model.generate(turn, do_sample=False, past_key_values=first.past_key_values, **self._kwargs())
                fresh = model.generate(turn, do_sample=False, use_cache=False, **self._kwargs())
                self.assertEqual(continued.shape[1], turn.shape[1] + MAX_NEW)
                self.assertTrue(torch.equal(continued, fresh), f"{model_class.__name__} static={static}")

    def test_generate_from_inputs_embeds_matches_input_ids(self):
        for model_class in self.all_generative_model_classes:
            model, ids = self._model(model_class), self._prompts()
            embeds = model.get_input_embeddings()(ids)
            from_ids = model.generate(ids, do_sample=False, **self._kwargs())
            from_embeds = model.generate(inputs_embeds=embeds, do_sample=False, **self._kwargs())
            self.assertTrue(torch.equal(from_embeds, from_ids[:, ids.shape[1] :]), model_class.__name__)
            both = model.generate(ids, inputs_embeds=embeds, do_sample=False, **self._kwargs())
            self.assertTrue(torch.equal(both, from_ids), model_class.__name__)

    # ------------------------------------------------------------------ speculative decoding

    def test_assisted_decoding_matches_greedy(self):
        for model_class in self.all_generative_model_classes:
            model, ids = self._model(model_class), self._prompts(batch=1)
            assistant = self._model(model_class, seed=7)  # a different model: many drafts get rejected
            greedy = model.generate(ids, do_sample=False, **self._kwargs())
            for draft in (model, assistant):  # all accepted / many rejected: both paths of the cache bookkeeping
                assisted = model.generate(ids, do_sample=False, assistant_model=draft, **self._kwargs())
                self.assertTrue(torch.equal(assisted, greedy), model_class.__name__)

    def test_prompt_lookup_decoding_matches_greedy(self):
        for model_class in self.all_generative_model_classes:
            model = self._model(model_class)
            ids = self._prompts(batch=1, length=4).repeat(1, 3)  # repeated n-grams: the lookup finds candidates
            greedy = model.generate(ids, do_sample=False, **self._kwargs())
            lookup = model.generate(ids, do_sample=False, prompt_lookup_num_tokens=3, **self._kwargs())
            self.assertTrue(torch.equal(lookup, greedy), model_class.__name__)

    # ------------------------------------------------------------------ pipeline

    def test_text_generation_pipeline_matches_generate(self):
        from transformers import PreTrainedTokenizerFast
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {f"w{i}": i for i in range(self.model_tester.vocab_size)}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w1"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w1", pad_token="w0")
        for model_class in self.all_generative_model_classes:
            model = self._model(model_class)
            generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
            text = "w5 w9 w17 w4 w30"
            got = generator(text, do_sample=False, return_full_text=False, **self._kwargs())[0]["generated_text"]
            ids = tokenizer(text, return_tensors="pt").input_ids
            expected = model.generate(ids, do_sample=False, **self._kwargs())[0, ids.shape[1] :]
            self.assertEqual(got.split(), [f"w{i}" for i in expected.tolist()])
