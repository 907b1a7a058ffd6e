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
