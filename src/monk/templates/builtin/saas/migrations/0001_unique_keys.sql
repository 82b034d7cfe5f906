-- Natural keys the product looks records up by. The compiler makes no unique constraints for
-- template schemas, so they are unique indexes here.
CREATE UNIQUE INDEX plan_code_key ON plan (code);
CREATE UNIQUE INDEX permission_key_key ON permission (key);
CREATE UNIQUE INDEX organization_slug_key ON organization (slug);
CREATE UNIQUE INDEX member_organization_id_email_key ON member (organization_id, email);
CREATE UNIQUE INDEX invoice_number_key ON invoice (number);
