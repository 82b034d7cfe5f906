-- What a clone does not copy, made the tenant's in one call: ownership (every object inside is
-- owned by pg_database_owner, so this hands the role all of them), connect rights, the
-- ownership mark, database settings. A function, so that the registry session that runs it in
-- the activation's transaction sends no ALTER of its own: a client that sees one (psycopg)
-- discards its prepared statements, which the next provision would then plan again.
CREATE FUNCTION configure_tenant_database(
    p_database text, p_role text, p_mark text, p_settings jsonb
) RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    setting record;
BEGIN
    -- format('%I') quotes identifiers on the server as psycopg.sql.Identifier does on the client.
    EXECUTE format('ALTER DATABASE %I OWNER TO %I', p_database, p_role);
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', p_database);
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', p_database, p_role);
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO CURRENT_USER', p_database);
    EXECUTE format('COMMENT ON DATABASE %I IS %L', p_database, p_mark);
    FOR setting IN SELECT key, value FROM jsonb_each_text(p_settings) LOOP
        EXECUTE format('ALTER DATABASE %I SET %s = %L', p_database,
                       (SELECT string_agg(quote_ident(part), '.')
                        FROM unnest(string_to_array(setting.key, '.')) AS part),
                       setting.value);
    END LOOP;
END
$$;
