-- Embedding texts with an explicit role. Every function that can call the
-- network is VOLATILE: never IMMUTABLE, so no plan caches a network result.

CREATE OR REPLACE FUNCTION omop_emb.embed(input text, role text, model text DEFAULT NULL) RETURNS vector
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "embed", input, role, model)
$$;
COMMENT ON FUNCTION omop_emb.embed(text, text, text) IS
'Embed one text. role is ''document'' (concept texts being indexed) or ''query'' (search terms): the matching prefix setting is prepended. model defaults to the setting omop_emb.model, else the only registered model. NULL or blank text gives NULL.';

CREATE OR REPLACE FUNCTION omop_emb.embed_batch(inputs text[], role text, model text DEFAULT NULL) RETURNS vector[]
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "embed_batch", inputs, role, model)
$$;
COMMENT ON FUNCTION omop_emb.embed_batch(text[], text, text) IS
'Embed many texts with one role in one HTTP request per chunk of the model''s batch_size (not one per text). Same order as the input; NULL for NULL or blank texts.';

CREATE OR REPLACE FUNCTION omop_emb.similarity(a text, b text, a_role text DEFAULT 'query', b_role text DEFAULT 'document', model text DEFAULT NULL)
RETURNS double precision
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "similarity", a, b, a_role, b_role, model)
$$;
COMMENT ON FUNCTION omop_emb.similarity(text, text, text, text, text) IS
'Cosine similarity of a (embedded with a_role) and b (embedded with b_role), e.g. similarity(''high blood pressure'', ''Hypertensive disorder'', ''query'', ''document'').';

CREATE OR REPLACE FUNCTION omop_emb.embedding_role_prefixes(model text DEFAULT NULL)
RETURNS TABLE (role text, prefix text, source text, setting_value text, recorded_prefix text)
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "embedding_role_prefixes", model)
$$;
COMMENT ON FUNCTION omop_emb.embedding_role_prefixes(text) IS
'The prefix applied to each role for a model, where it came from (setting or model record), the setting''s value (NULL = not set) and the prefix recorded for the model.';
