// The Azure Bot resource that connects Lamina to Microsoft Teams.
// Deploy after the app: `endpoint` is the app's public https URL plus /api/messages.
//
//   az deployment group create -g <rg> -f infra/bot.bicep \
//     -p name=lamina-bot endpoint=https://<app>/api/messages appId=<bot app id> \
//        appTenantId=<tenant id>
//
// The app registration (appId) and its client secret are created in Entra ID; give the
// secret to Lamina as LAMINA_TEAMS__APP_SECRET (from Key Vault), and LAMINA_TEAMS__APP_ID,
// LAMINA_TEAMS__APP_TENANT_ID, LAMINA_TEAMS__ENABLED=true.

@description('Name of the Azure Bot resource (globally unique).')
param name string

@description('The messaging endpoint: https://<your app>/api/messages')
param endpoint string

@description('The bot\'s Microsoft App ID (Entra app registration client id).')
param appId string

@description('Tenant of the app registration (single-tenant bot).')
param appTenantId string = tenant().tenantId

@description('Display name shown in Teams.')
param displayName string = 'Lamina'

@allowed([ 'F0', 'S1' ])
@description('F0 is free for Teams (a standard channel).')
param sku string = 'F0'

resource bot 'Microsoft.BotService/botServices@2022-09-15' = {
  name: name
  location: 'global'
  kind: 'azurebot'
  sku: { name: sku }
  properties: {
    displayName: displayName
    endpoint: endpoint
    msaAppId: appId
    msaAppType: 'SingleTenant'
    msaAppTenantId: appTenantId
    disableLocalAuth: false
  }
}

resource teams 'Microsoft.BotService/botServices/channels@2022-09-15' = {
  parent: bot
  name: 'MsTeamsChannel'
  location: 'global'
  properties: {
    channelName: 'MsTeamsChannel'
    properties: {
      isEnabled: true
    }
  }
}

output botId string = bot.properties.msaAppId
