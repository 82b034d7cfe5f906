-- A rebuild swaps the template's database and the registry's current build in one transaction; a
-- clone made while it ran may hold the new content or the old. A clone's build was checked by a
-- read of the registry right after the clone (a round trip of its own on every provision); it is
-- now checked inside the commit that uses the clone (a provision's activation, a spare's
-- `ready`): raising SQLSTATE MK002 rolls that transaction back whole, and the caller drops the
-- clone and clones again from the build that is current now.
CREATE FUNCTION assert_current_build(p_key text, p_host text, p_build uuid)
RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM template_builds
        WHERE key = p_key AND host = p_host AND is_current AND id = p_build
    ) THEN
        RAISE EXCEPTION 'template % on % was rebuilt since build % was cloned', p_key, p_host,
            p_build USING ERRCODE = 'MK002';
    END IF;
END
$$;
