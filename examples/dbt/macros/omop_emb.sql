{#- Helpers for calling the omop_emb SQL functions from models. -#}

{# A Python/YAML list of strings as a text[] literal (NULL when empty or none). #}
{% macro omop_emb_text_array(values) -%}
  {%- if values is none or values | length == 0 -%}
    null::text[]
  {%- else -%}
    array[{%- for v in values -%}{{ dbt.string_literal(v) }}{{ ", " if not loop.last }}{%- endfor -%}]::text[]
  {%- endif -%}
{%- endmacro %}

{# The model argument: var('omop_emb_model') or NULL (session default). #}
{% macro omop_emb_model() -%}
  {%- set m = var('omop_emb_model', none) -%}
  {%- if m is none or m == '' -%}null::text{%- else -%}{{ dbt.string_literal(m) }}{%- endif -%}
{%- endmacro %}

{# The mapping job this project maps its source terms in: var('mapping_job'), else
   '<target schema>_local_dx' (one job per dbt target). #}
{% macro omop_emb_mapping_job() -%}
  {{- dbt.string_literal(var('mapping_job', none) or (target.schema ~ '_local_dx')) -}}
{%- endmacro %}

{#
  SQL (for a pre_hook, rendered when the model runs) that keeps a mapping job in step with a relation of
  source terms: create the job once, add terms that are new, suggest candidates
  for terms without current ones (through nearest_batch; nothing is embedded
  again on a re-run), and approve, marked automatic, the clear rank-1
  candidates (similarity margin over rank 2 >= var('auto_approve_margin')).
  Human decisions (SQL, review page, Usagi import) are never replaced.
#}
{% macro omop_emb_sync_mapping_job(source_relation, code_column, name_column) -%}
  {%- set job = omop_emb_mapping_job() -%}
  {%- set query = dbt.string_literal('select ' ~ code_column ~ ' as source_code, ' ~ name_column
                                      ~ ' as source_name from ' ~ source_relation) -%}
  {%- set statements = [
      "select omop_emb.create_mapping_job(" ~ job ~ ", " ~ query ~ ", model => " ~ omop_emb_model()
        ~ ", domain_ids => " ~ omop_emb_text_array(var('mapping_domains'))
        ~ ", source_vocabulary_id => " ~ dbt.string_literal(var('source_vocabulary_id'))
        ~ ", vocabulary_schema => " ~ dbt.string_literal(var('cdm_schema'))
        ~ ") where not exists (select 1 from omop_emb.mapping_job where name = " ~ job ~ ")",
      "select omop_emb.add_mapping_terms(" ~ job ~ ", " ~ query ~ ")",
      "select omop_emb.suggest_mappings_start(" ~ job ~ ")",
      "select omop_emb.suggest_mappings_batch(" ~ job ~ ", 10000)",
      "select omop_emb.auto_approve(" ~ job ~ ", " ~ var('auto_approve_margin') ~ ")",
  ] -%}
  {{- return(statements | join(';\n')) -}}
{%- endmacro %}
