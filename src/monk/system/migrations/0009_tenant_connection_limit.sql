-- A tenant's own connection limit (NULL: the installation's MONK_TENANT_CONNECTION_LIMIT), the
-- CONNECTION LIMIT of its role, so that one tenant cannot take every connection of the server.
ALTER TABLE tenants ADD COLUMN connection_limit integer
    CHECK (connection_limit BETWEEN 1 AND 10000);

-- configure_tenant_database also sets the role's connection limit: the activation's one
-- statement keeps doing all of what a clone does not copy.
DROP FUNCTION configure_tenant_database(text, text, text, jsonb);
CREATE FUNCTION configure_tenant_database(
    p_database text, p_role text, p_mark text, p_settings jsonb, p_connection_limit integer
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
    EXECUTE format('ALTER ROLE %I CONNECTION LIMIT %s', p_role, p_connection_limit);
    FOR setting IN SELECT key, value FROM jsonb_each_text(p_settings) LOOP
        EXECUTE format('ALTER DATABASE %I SET %s = %L', p_database,
                       (SELECT string_agg(quote_ident(part), '.')
                        FROM unnest(string_to_array(setting.key, '.')) AS part),
                       setting.value);
    END LOOP;
END
$$;
